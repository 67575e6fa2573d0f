"""Ahead-of-time compile every Triton kernel of ``kernels/`` and ``engine/generation/attention/`` for an H100
(sm_90), without a GPU.

The unit tests run the kernels in Triton's CPU interpreter, which never lowers them: loop-carried type mismatches,
constexpr misuse, ops without a GPU lowering or int32/int64 pointer-offset mixing only fail when a kernel is compiled
for a real target. This script compiles each kernel through the full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX ->
cubin with ptxas) for ``GPUTarget("cuda", 90, 32)``, once per variant the launchers can produce:

- every constexpr branch (estimators, ``HAS_*`` switches, aggregation modes, block sizes, ``num_warps``);
- each input dtype the public API accepts (float32 / bfloat16 / float16 inputs, bool masks viewed as uint8 and
  numeric masks, int64 / int32 labels), at least once per kernel;
- scalar ints as ``i32``, as ``i64`` where the value can exceed 2**31 (strides and row counts of large tensors), and
  as the constant 1 where a launch commonly passes 1: Triton's launcher turns an int argument equal to 1 into a
  constexpr (contiguous column strides, one token chunk per row, ``L2 = 1`` for contiguous logits, ``G = 1``).

Pointers carry ``tt.divisibility = 16`` (what a launch with freshly allocated tensors passes); other ints carry no
divisibility hint (the generic code path). The variants are the table below, one ``*_variants`` builder per kernel
module listed in ``BUILDERS``, each returning ``Variant`` rows: one row per ``triton.compile`` call. Every
``@triton.jit`` function of the scanned packages (``PACKAGES``: ``kernels/``, and the generator's attention backends,
whose kernels are named ``attention.<module>.<function>``) must either have a variant or be listed in
``DEVICE_FUNCTIONS`` (helpers inlined into the kernels), so a new kernel without a variant fails the check.

Usage (TRITON_INTERPRET must be unset: under the interpreter ``triton.jit`` returns interpreter functions; this
script drops it before importing anything)::

    python tests/gpu_compile_check.py                # compile all variants; exit 1 if any fails
    python tests/gpu_compile_check.py -k logprobs    # only the variants whose kernel or name contains 'logprobs'
    python tests/gpu_compile_check.py --list         # print the variants, compile nothing
    python tests/gpu_compile_check.py --fresh-cache  # compile in an empty Triton cache (else cache hits are reused)

Exit status: 0 all compiled, 1 a variant failed (its error is printed), 2 the table is inconsistent with the kernels
(an argument without a type, a kernel without a variant), 3 nothing can be checked here (triton, its NVIDIA backend or
ptxas missing): the reason is printed on a line starting with ``SKIP:``.

The compile runs with the triton that ``import triton`` finds. To check against the H100's triton (3.6) from a
machine with another one, put it first on the path::

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python tests/gpu_compile_check.py
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import multiprocessing
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton or kernels are imported: we need real JITFunctions
# triton 3.9 warns when this is unset; 1 is the default of the triton the H100 runs (3.6), so compile as it does.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

REPO = Path(__file__).resolve().parents[1]
# First on the path, ahead of this script's own folder (sys.path[0] = tests/), whose tests/engine package would
# otherwise shadow the real engine package (seen on the GPU box, where PYTHONPATH put the repo after tests/).
sys.path[:] = [str(REPO)] + [p for p in sys.path if p != str(REPO)]

SKIP_RC = 3
TABLE_RC = 2
TARGET = ("cuda", 90, 32)  # H100: compute capability 9.0, 32-thread warps

# Device functions: @triton.jit helpers called from the kernels, compiled (inlined) through them.
DEVICE_FUNCTIONS = {
    "_math._log1p", "_math._logsigmoid", "_math._sigmoid",
    "kl._kl_value_and_grad", "loss_agg.token_tile", "advantages._masked_mean", "sampling._fmix32",
    "rope_cache._rope_pair", "attention.triton_cascade._merge_part",
}


@dataclass(frozen=True)
class Variant:
    """One ``triton.compile`` call: ``kernel`` is ``"module.function"`` under ``kernels`` (or
    ``"attention.module.function"``, see ``PACKAGES``); ``sig`` types every runtime
    argument (``"*bf16"`` pointer, ``"i32"``, ``"i64"``, ``"fp32"``); ``const`` gives every constexpr argument and
    every int argument specialised to the constant 1."""

    kernel: str
    name: str
    sig: dict
    const: dict
    num_warps: int = 4
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kernel} [{self.name}]"


def p(dtype: str) -> str:
    """Pointer type string of a tensor of Triton dtype ``dtype``."""
    return "*" + dtype


FLOATS = ("fp32", "bf16", "fp16")  # the float dtypes the public API accepts (fp64 runs the reference)
MASKS = ("u8", "fp32", "i64", "bf16")  # bool masks are viewed as uint8; numeric masks pass through unconverted


def rot(seq, i):
    return seq[i % len(seq)]


# --------------------------------------------------------------------------------------------------------- the table
def kl_variants(V) -> list[Variant]:
    rows = []
    for i, (est, has_max) in enumerate(product(range(4), (False, True))):
        dt = rot(FLOATS, i)
        const = {"ESTIMATOR": est, "HAS_MAX_KL": has_max, "BLOCK": V.kl._BLOCK}
        name = f"est={est} max_kl={has_max} {dt}"
        fwd = {"KL": "*fp32", "LP": p(dt), "REF": p(dt), "N": "i32", "max_kl": "fp32"}
        bwd = {"DLP": p(dt), "DKL": "*fp32", "LP": p(dt), "REF": p(dt), "N": "i32", "max_kl": "fp32"}
        rows.append(Variant("kl._kl_penalty_fwd_kernel", name, fwd, const))
        rows.append(Variant("kl._kl_penalty_bwd_kernel", name, bwd, const))
    # mixed input dtypes (nothing forces lp and ref to share one) and more than 2**31 elements
    const = {"ESTIMATOR": 2, "HAS_MAX_KL": True, "BLOCK": V.kl._BLOCK}
    fwd = {"KL": "*fp32", "LP": "*bf16", "REF": "*fp32", "N": "i64", "max_kl": "fp32"}
    bwd = {"DLP": "*fp16", "DKL": "*fp32", "LP": "*fp16", "REF": "*bf16", "N": "i64", "max_kl": "fp32"}
    rows.append(Variant("kl._kl_penalty_fwd_kernel", "k3 lp=bf16 ref=fp32 N=i64", fwd, const))
    rows.append(Variant("kl._kl_penalty_bwd_kernel", "k3 lp=fp16 ref=bf16 N=i64", bwd, const))
    return rows


def logprobs_variants(V) -> list[Variant]:
    lpm = V.logprobs
    # Row layouts: contiguous logits give L2 == 1 (a constexpr at launch) and stride_t == 0; logits[:, :-1, :] of a
    # [B, L, V] tensor gives two strided levels, and stride_b = L * V can exceed 2**31.
    layouts = {
        "contig": ({"V": "i32", "stride_b": "i32", "stride_t": "i32"}, {"L2": 1}),
        "strided": ({"V": "i32", "L2": "i32", "stride_b": "i64", "stride_t": "i32"}, {}),
    }
    vocab = {"V=151936": 151936, "V=1000": 1000, "V=10": 10}  # BLOCK_V 4096 / 1024 / 16 through the launcher
    stats = {"ROW_MAX": "*fp32", "LOG_SUM": "*fp32", "MEAN_D": "*fp32", "inv_temp": "fp32", "ignore_index": "i32"}

    fwd = [  # (logits dtype, labels dtype or None for entropy_from_logits, vocabulary, layout)
        ("bf16", "i64", "V=151936", "contig"),
        ("fp32", "i64", "V=151936", "contig"),  # fused_linear_logprobs: float32 logits tiles
        ("fp16", "i32", "V=1000", "contig"),
        ("bf16", "i32", "V=10", "strided"),
        ("bf16", None, "V=151936", "contig"),
        ("fp32", None, "V=10", "strided"),
    ]
    rows = []
    for dt, lab, voc, lay in fwd:
        block = lpm._block_v(vocab[voc])
        layout_sig, layout_const = layouts[lay]
        # without labels the launcher passes the float32 entropy buffer for LP and LABELS
        sig = {"LP": "*fp32", "ENT": "*fp32", "X": p(dt), "LABELS": p(lab or "fp32"), **stats, **layout_sig}
        const = {"HAS_LABELS": lab is not None, "BLOCK_V": block, **layout_const}
        rows.append(Variant("logprobs._logprobs_fwd_kernel", f"{dt} labels={lab} {voc} {lay}", sig, const,
                            num_warps=lpm._num_warps(block)))

    bwd = [  # (logits dtype, labels dtype or None, has dlp, has dent, vocabulary, layout): the reachable flag sets
        ("bf16", "i64", True, False, "V=151936", "contig"),  # logprobs only
        ("fp16", "i32", False, True, "V=1000", "contig"),  # entropy of a labelled call only
        ("fp32", "i64", True, True, "V=151936", "contig"),  # both
        ("bf16", None, False, True, "V=151936", "contig"),  # entropy_from_logits
        ("bf16", "i32", True, True, "V=10", "strided"),
        ("fp32", None, False, True, "V=10", "strided"),
    ]
    for dt, lab, has_dlp, has_dent, voc, lay in bwd:
        block = lpm._block_v(vocab[voc])
        layout_sig, layout_const = layouts[lay]
        # missing labels / upstream gradients: the launcher passes the float32 stats buffer instead
        sig = {"DX": p(dt), "X": p(dt), "LABELS": p(lab or "fp32"), "DLP": "*fp32", "DENT": "*fp32", **stats,
               **layout_sig}
        const = {"HAS_LABELS": lab is not None, "HAS_DLP": has_dlp, "HAS_DENT": has_dent, "BLOCK_V": block,
                 **layout_const}
        rows.append(Variant("logprobs._logprobs_bwd_kernel", f"{dt} labels={lab} dlp={has_dlp} dent={has_dent} "
                            f"{voc} {lay}", sig, const, num_warps=lpm._num_warps(block)))
    return rows


def loss_agg_variants(V) -> list[Variant]:
    la = V.loss_agg
    rows = []
    # NSTAT / N_WEIGHTED of the two callers: ppo_loss (9 statistics, 2 weighted) and value_loss (4, 1)
    callers = {"ppo": (len(V.ppo_loss._STATS), V.ppo_loss._N_WEIGHTED), "value": (len(V.value_loss._STATS), 1)}
    agg = [  # (caller, mode, B, C): C == 1 (T <= 1024 on the GPU) and B == 1 are constexprs at launch
        ("ppo", 0, "i32", 1), ("ppo", 1, "i32", "i32"), ("ppo", 2, "i32", 1), ("ppo", 3, "i32", "i32"),
        ("value", 0, "i32", "i32"), ("value", 1, 1, 1),
    ]
    for caller, mode, b, c in agg:
        nstat, n_weighted = callers[caller]
        sig = {"OUT": "*fp32", "W": "*fp32", "STATS": "*fp32", "n_tok": "fp32", "n_seq": "fp32", "scale": "fp32"}
        const = {"NSTAT": nstat, "N_WEIGHTED": n_weighted, "MODE": mode, "BLOCK_B": 256,
                 "BLOCK_S": V.triton.next_power_of_2(nstat)}
        for arg, val in (("B", b), ("C", c)):
            (const if val == 1 else sig)[arg] = val
        rows.append(Variant("loss_agg._agg_rows_kernel", f"{caller} mode={la.LOSS_AGG_MODES[mode]} B={b} C={c}",
                            sig, const))
    for i, dt in enumerate(FLOATS):
        block = la.block_t(4096 if i < 2 else 10)  # 1024, 1024, 16
        sig = {"DX": p(dt), "DL": "*fp32", "W": "*fp32", "G": "*fp32", "T": "i32"}
        rows.append(Variant("loss_agg._apply_row_weights_kernel", f"dx={dt} BLOCK_T={block}", sig,
                            {"BLOCK_T": block}))
    return rows


def ppo_variants(V) -> list[Variant]:
    nstat = len(V.ppo_loss._STATS)
    scalars = {"clip_low": "fp32", "clip_high": "fp32", "clip_c": "fp32", "kl_coef": "fp32"}
    policy_names = V.ppo_loss.POLICY_LOSSES

    def row(i, policy, dual, isw, kl, est):
        dt = rot(FLOATS, i)
        per_seq_adv = i % 2 == 0
        # without ref_logprobs / IS weights / gspo's [B] float32 sequence log-ratios the launcher passes the
        # logprobs pointer in their place
        sig = {"DL": "*fp32", "STATS": "*fp32", "T": "i32", "LP": p(dt), "OLD": p(dt), "ADV": "*fp32",
               "MASK": p(rot(MASKS, i)), "REF": p("fp32" if kl else dt), "ISW": p("fp32" if isw else dt),
               "SEQ_LR": p("fp32" if policy == 1 else dt), **scalars}
        const = {"HAS_DUAL_CLIP": dual, "HAS_ISW": isw, "HAS_KL": kl, "KL_ESTIMATOR": est if kl else 2,
                 "POLICY_LOSS": policy, "NSTAT": nstat, "BLOCK_T": V.loss_agg.block_t(4096)}
        # per-sequence advantages [B, 1] expanded: strides (1, 0); per-token [B, T] contiguous: (T, 1)
        if per_seq_adv:
            const["stride_adv_b"], sig["stride_adv_t"] = 1, "i32"
        else:
            sig["stride_adv_b"], const["stride_adv_t"] = "i32", 1
        if isw:  # per-token IS weights: strides (T, 1)
            sig["stride_isw_b"], const["stride_isw_t"] = "i32", 1
        else:  # no IS weights: the launcher passes strides 0, 0
            sig["stride_isw_b"], sig["stride_isw_t"] = "i32", "i32"
        if i % 2:
            const["C"] = 1  # one token chunk per row (T <= 1024)
        else:
            sig["C"] = "i32"
        name = (f"{policy_names[policy]} dual={dual} isw={isw} kl={kl}" + (f" est={est}" if kl else "")
                + f" {dt} mask={sig['MASK'][1:]} adv={'seq' if per_seq_adv else 'tok'} C={sig.get('C', 1)}")
        return Variant("ppo_loss._ppo_loss_fwd_kernel", name, sig, const)

    rows = []
    kl_rows = 0
    for i, (dual, isw, kl) in enumerate(product((False, True), repeat=3)):  # vanilla: every switch
        rows.append(row(i, 0, dual, isw, kl, kl_rows % 4))
        kl_rows += kl
    # gspo (every switch, dual clip included) and cispo (no dual clip): each switch on and off at least once
    for i, (policy, dual, isw, kl) in enumerate([(1, False, False, False), (1, True, True, True),
                                                 (1, False, True, False), (1, True, False, True),
                                                 (2, False, False, False), (2, False, True, True),
                                                 (2, False, True, False), (2, False, False, True)]):
        rows.append(row(i, policy, dual, isw, kl, i % 4))
    # every int generic (strided advantages and IS weights), mixed dtypes, short responses (BLOCK_T 16)
    for policy in range(len(policy_names)):
        sig = {"DL": "*fp32", "STATS": "*fp32", "T": "i32", "C": "i32", "LP": "*bf16", "OLD": "*fp16",
               "ADV": "*bf16", "MASK": "*i32", "REF": "*bf16", "ISW": "*fp32",
               "SEQ_LR": "*fp32" if policy == 1 else "*bf16", "stride_adv_b": "i32", "stride_adv_t": "i32",
               "stride_isw_b": "i32", "stride_isw_t": "i32", **scalars}
        const = {"HAS_DUAL_CLIP": policy != 2, "HAS_ISW": True, "HAS_KL": True, "KL_ESTIMATOR": 2,
                 "POLICY_LOSS": policy, "NSTAT": nstat, "BLOCK_T": V.loss_agg.block_t(10)}
        rows.append(Variant("ppo_loss._ppo_loss_fwd_kernel", f"{policy_names[policy]} all ints i32 bf16 lp, fp16 "
                            "old, bf16 adv, i32 mask BLOCK_T=16", sig, const))
    return rows


def value_variants(V) -> list[Variant]:
    nstat = len(V.value_loss._STATS)
    rows = []
    for i, (clip, dt) in enumerate([(True, "bf16"), (False, "fp32"), (True, "fp16")]):
        generic = i == 2  # float32 targets for fp16 values, several token chunks, short responses
        other = "fp32" if generic else dt
        sig = {"DL": "*fp32", "STATS": "*fp32", "T": "i32", "V": p(dt), "OLD": p(other), "RET": p(other),
               "MASK": p(rot(MASKS, i)), "clip": "fp32"}
        const = {"HAS_CLIP": clip, "NSTAT": nstat, "BLOCK_T": V.loss_agg.block_t(10 if generic else 4096)}
        if generic:
            sig["C"] = "i32"
        else:
            const["C"] = 1
        rows.append(Variant("value_loss._value_loss_fwd_kernel",
                            f"clip={clip} {dt} old/ret={other} mask={sig['MASK'][1:]} BLOCK_T={const['BLOCK_T']}",
                            sig, const))
    return rows


def gae_variants(V) -> list[Variant]:
    g = V.gae
    rows = []
    # Contiguous [B, T] inputs have a column stride of 1 (a constexpr at launch); a sliced batch has generic strides.
    cases = [  # (skip_masked, rewards dtype, values dtype, mask dtype, B, contiguous)
        (True, "fp32", "fp32", "u8", 4096, True), (False, "bf16", "bf16", "fp32", 8, True),
        (True, "fp16", "bf16", "i64", 8, False), (False, "fp32", "fp16", "u8", 4096, False),
    ]
    for skip, r_dt, v_dt, m_dt, B, contiguous in cases:
        sig = {"ADV": "*fp32", "RET": "*fp32", "R": p(r_dt), "V": p(v_dt), "M": p(m_dt), "B": "i32", "T": "i32",
               "gamma": "fp32", "gamma_lam": "fp32"}
        const = {"SKIP_MASKED": skip, "BLOCK_B": g._block_b(B)}
        for t in ("r", "v", "m"):
            sig[f"stride_{t}b"] = "i32"
            if contiguous:
                const[f"stride_{t}t"] = 1
            else:
                sig[f"stride_{t}t"] = "i32"
        name = (f"skip_masked={skip} r={r_dt} v={v_dt} m={m_dt} BLOCK_B={const['BLOCK_B']} "
                f"{'contig' if contiguous else 'strided'}")
        rows.append(Variant("gae._gae_fwd_kernel", name, sig, const))
    for r_dt, m_dt, B, contiguous in [("fp32", "u8", 4096, True), ("bf16", "fp32", 8, False),
                                      ("fp16", "i64", 8, True)]:
        sig = {"RET": "*fp32", "R": p(r_dt), "M": p(m_dt), "B": "i32", "T": "i32", "gamma": "fp32"}
        const = {"BLOCK_B": g._block_b(B)}
        for t in ("r", "m"):
            sig[f"stride_{t}b"] = "i32"
            if contiguous:
                const[f"stride_{t}t"] = 1
            else:
                sig[f"stride_{t}t"] = "i32"
        name = f"r={r_dt} m={m_dt} BLOCK_B={const['BLOCK_B']} {'contig' if contiguous else 'strided'}"
        rows.append(Variant("gae._discounted_returns_fwd_kernel", name, sig, const))
    return rows


def advantages_variants(V) -> list[Variant]:
    adv = V.advantages
    rows = []
    scalars = {"inv_g": "fp32", "inv_dof": "fp32", "rloo_scale": "fp32", "epsilon": "fp32"}
    group = [  # (estimator, norm_by_std, scores dtype, G): G == 1 is the SINGLETON branch (G a constexpr 1 there)
        (0, True, "fp32", 1), (0, False, "bf16", 1), (1, True, "fp16", 1),
        (0, True, "bf16", 16), (0, False, "fp32", 16), (1, True, "fp16", 16), (0, True, "fp32", 4096),
    ]
    for est, norm, dt, G in group:
        block = 1 if G == 1 else min(V.triton.next_power_of_2(G), adv._GROUP_MAX_BLOCK)
        sig = {"OUT": "*fp32", "S": p(dt), **scalars}
        const = {"ESTIMATOR": est, "NORM_BY_STD": norm, "SINGLETON": G == 1, "BLOCK": block}
        if G == 1:
            const["G"] = 1
        else:
            sig["G"] = "i32"
        if G == 4096:  # a strided score vector
            sig["stride_s"] = "i32"
        else:
            const["stride_s"] = 1
        rows.append(Variant("advantages._group_advantages_kernel",
                            f"{adv.ADVANTAGE_ESTIMATORS[est]} norm_by_std={norm} {dt} G={G} BLOCK={block}",
                            sig, const))
    # masked_whiten: NUM_PROGRAMS = min(cdiv(N, 1024), 256) partials, PART_BLOCK its next power of 2
    whiten = [("bf16", "u8", "i32", 256), ("fp32", "fp32", "i32", 1), ("fp16", "i64", "i64", 3)]
    for i, (v_dt, m_dt, n, parts) in enumerate(whiten):
        shapes = {"BLOCK": adv._BLOCK, "NUM_PROGRAMS": parts}
        part_block = V.triton.next_power_of_2(parts)
        name = f"v={v_dt} m={m_dt} N={n} NUM_PROGRAMS={parts}"
        sig = {"PART": "*fp32", "V": p(v_dt), "M": p(m_dt), "N": n}
        rows.append(Variant("advantages._masked_sum_kernel", name, sig, shapes))
        sig = {"PART_SQ": "*fp32", "PART_SUM": "*fp32", "V": p(v_dt), "M": p(m_dt), "N": n, "inv_n": "fp32"}
        rows.append(Variant("advantages._masked_sq_dev_kernel", name, sig, {**shapes, "PART_BLOCK": part_block}))
        sig = {"OUT": "*fp32", "PART_SUM": "*fp32", "PART_SQ": "*fp32", "V": p(v_dt), "N": n, "inv_n": "fp32",
               "inv_nm1": "fp32", "epsilon": "fp32"}
        const = {**shapes, "PART_BLOCK": part_block, "SHIFT_MEAN": i != 1}
        rows.append(Variant("advantages._whiten_apply_kernel", f"shift_mean={i != 1} v={v_dt} N={n} "
                            f"NUM_PROGRAMS={parts}", sig, const))
    return rows


def dpo_variants(V) -> list[Variant]:
    d = V.dpo_loss
    rows = []
    # (ipo, policy dtype, reference dtype, B): B == 1 is a constexpr at launch
    for ipo, pol, ref, B in [(False, "bf16", "fp32", 64), (True, "fp32", "fp32", 1000), (False, "fp16", "fp16", 1)]:
        sig = {"LOSS": "*fp32", "METRICS": "*fp32", "GRAD": "*fp32", "PC": p(pol), "PR": p(pol), "RC": p(ref),
               "RR": p(ref), "beta": "fp32", "c_pos": "fp32", "c_neg": "fp32", "inv_B": "fp32"}
        const = {"IS_IPO": ipo, "BLOCK": d._block(B)}
        if B == 1:
            const["B"] = 1
        else:
            sig["B"] = "i32"
        rows.append(Variant("dpo_loss._dpo_loss_fwd_kernel",
                            f"ipo={ipo} policy={pol} ref={ref} B={B} BLOCK={const['BLOCK']}", sig, const))
    # gradients nobody needs get the float32 GRAD buffer as a placeholder pointer
    for pol_grad, ref_grad, dt in [(True, False, "bf16"), (False, True, "fp32"), (True, True, "fp16")]:
        pol_dt, ref_dt = (dt if pol_grad else "fp32"), (dt if ref_grad else "fp32")
        sig = {"DPC": p(pol_dt), "DPR": p(pol_dt), "DRC": p(ref_dt), "DRR": p(ref_dt), "GRAD": "*fp32",
               "DOUT": "*fp32", "B": "i32"}
        const = {"HAS_POLICY_GRAD": pol_grad, "HAS_REF_GRAD": ref_grad, "BLOCK": d._block(64)}
        rows.append(Variant("dpo_loss._dpo_loss_bwd_kernel", f"policy_grad={pol_grad} ref_grad={ref_grad} {dt}",
                            sig, const))
    return rows


def reward_variants(V) -> list[Variant]:
    r = V.reward_loss
    rows = []
    for i, (has_margin, has_center) in enumerate(product((False, True), repeat=2)):
        dt = rot(FLOATS, i)
        margin_dt = "fp32" if has_margin else dt  # no margin tensor: the launcher passes the chosen rewards
        block = r._block(1000 if i == 3 else 64)
        sig = {"LOSS": "*fp32", "GC": "*fp32", "GR": "*fp32", "RC": p(dt), "RR": p(dt), "M": p(margin_dt),
               "B": "i32", "margin": "fp32", "center_coef": "fp32", "inv_B": "fp32"}
        const = {"HAS_MARGIN_TENSOR": has_margin, "HAS_CENTER": has_center, "BLOCK": block}
        rows.append(Variant("reward_loss._pairwise_reward_loss_fwd_kernel",
                            f"margin_tensor={has_margin} center={has_center} {dt} BLOCK={block}", sig, const))
    for dc, dr in [("bf16", "fp32"), ("fp16", "fp16")]:
        sig = {"DC": p(dc), "DR": p(dr), "GC": "*fp32", "GR": "*fp32", "DOUT": "*fp32", "B": "i32"}
        rows.append(Variant("reward_loss._pairwise_reward_loss_bwd_kernel", f"dc={dc} dr={dr}", sig,
                            {"BLOCK": r._block(64)}))
    return rows


def attention_variants(V) -> list[Variant]:
    """The paged flash-decoding kernels of ``engine/generation/attention/triton_backend.py``, with the tiles its
    launcher picks (``decode_tiles``) for the GQA groups and head dims of common checkpoints."""
    tb = V.attention.triton_backend
    rows = []
    # (G = H / H_kv, head dim, block size, q dtype, cache dtype, HAS_SPLITS): G == 1 is a constexpr at launch (MHA);
    # G < 4 takes the broadcast path, G >= 4 tl.dot; 7 is Qwen2.5-7B (28 / 4), 32 takes two programs per kv head; head
    # dim 80 pads to 128; block sizes 1 and 3 gather one token per block and a non-power-of-two block.
    cases = [
        (1, 128, 16, "bf16", "bf16", True), (1, 128, 16, "bf16", "bf16", False), (1, 64, 3, "fp32", "fp32", True),
        (1, 256, 16, "fp16", "fp16", True), (2, 128, 16, "bf16", "bf16", True), (2, 64, 32, "fp16", "fp16", False),
        (3, 16, 16, "fp32", "fp32", True), (4, 128, 16, "fp16", "fp16", False), (4, 128, 16, "bf16", "bf16", True),
        (7, 128, 1, "bf16", "bf16", True), (8, 256, 256, "bf16", "bf16", True), (8, 80, 16, "fp32", "bf16", True),
        (16, 128, 16, "fp16", "fp16", False), (16, 64, 16, "fp32", "fp32", True), (6, 256, 16, "fp32", "fp32", True),
        (32, 128, 16, "fp32", "bf16", True),
    ]
    torch_dtype = {"fp32": V.torch.float32, "bf16": V.torch.bfloat16, "fp16": V.torch.float16}
    for G, D, bs, q_dt, c_dt, splits in cases:
        t = tb.decode_tiles(G, D, torch_dtype[c_dt], interpret=False)
        o_dt, lse_dt = ("fp32", "fp32") if splits else (q_dt, q_dt)  # one split: the output doubles as both
        sig = {"O": p(o_dt), "LSE": p(lse_dt), "Q": p(q_dt), "K_CACHE": p(c_dt), "V_CACHE": p(c_dt),
               "BLOCK_TABLES": "*i32", "CONTEXT_LENS": "*i32", "START_BLOCKS": "*i32",  # context_lens as a dummy
               "scale_log2": "fp32", "D": "i32", "split_len": "i32",
               "stride_qs": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kt": "i32", "stride_kh": "i32",
               "stride_vb": "i32", "stride_vt": "i32", "stride_vh": "i32", "stride_bts": "i32",
               "stride_os": "i32", "stride_oh": "i32", "stride_oc": "i32", "stride_ls": "i32", "stride_lh": "i32"}
        const = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1, "BLOCK_SIZE": bs,
                 "BLOCK_N": t.block_n, "BLOCK_H": t.block_h, "BLOCK_D": t.block_d, "IS_DOT": t.is_dot,
                 "IS_DOT_F32": c_dt == "fp32", "HAS_SPLITS": splits, "HAS_START": False}
        for arg, val in (("G", G), ("n_hblocks", -(-G // t.block_h))):  # 1 is a constexpr at launch
            (const if val == 1 else sig)[arg] = val if val == 1 else "i32"
        rows.append(Variant("attention.triton_backend._paged_decode_split_kernel",
                            f"G={G} D={D} block={bs} q={q_dt} cache={c_dt} splits={splits} dot={t.is_dot} "
                            f"BLOCK_H={t.block_h} BLOCK_N={t.block_n}", sig, const, num_warps=t.num_warps))
    for D, dt in [(128, "bf16"), (64, "fp16"), (256, "fp32"), (80, "bf16")]:
        block_d = max(16, V.triton.next_power_of_2(D))
        sig = {"OUT": p(dt), "O_PART": "*fp32", "LSE_PART": "*fp32", "CONTEXT_LENS": "*i32", "D": "i32",
               "split_len": "i32", "stride_outs": "i32", "stride_outh": "i32", "stride_ps": "i32", "stride_ph": "i32",
               "stride_pc": "i32", "stride_ls": "i32", "stride_lh": "i32"}
        rows.append(Variant("attention.triton_backend._paged_decode_reduce_kernel", f"D={D} out={dt}", sig,
                            {"stride_outd": 1, "BLOCK_D": block_d}, num_warps=1 if block_d <= 64 else 2))
    return rows + cascade_variants(V)


def cascade_variants(V) -> list[Variant]:
    """Shared-prefix (cascade) decode (``shared_prefix_decode_attention``): the suffix pass of the split kernel
    (``HAS_START``, float32 scratch, ``stride_lh = 1`` when one split covers the longest context), the prefix kernel
    with the tiles ``prefix_tiles`` picks for ``M`` members x ``G`` query heads, and the merge kernel."""
    tb, tc = V.attention.triton_backend, V.attention.triton_cascade
    torch_dtype = {"fp32": V.torch.float32, "bf16": V.torch.bfloat16, "fp16": V.torch.float16}
    rows = []
    # suffix: (G, D, block size, q dtype, cache dtype, one split)
    for G, D, bs, q_dt, c_dt, one in [(1, 128, 16, "bf16", "bf16", True), (7, 128, 16, "bf16", "bf16", False),
                                      (2, 64, 1, "fp16", "fp16", False), (4, 256, 16, "fp32", "fp32", True),
                                      (8, 80, 3, "fp32", "bf16", False)]:
        t = tb.decode_tiles(G, D, torch_dtype[c_dt], interpret=False)
        sig = {"O": "*fp32", "LSE": "*fp32", "Q": p(q_dt), "K_CACHE": p(c_dt), "V_CACHE": p(c_dt),
               "BLOCK_TABLES": "*i32", "CONTEXT_LENS": "*i32", "START_BLOCKS": "*i64", "scale_log2": "fp32",
               "D": "i32", "split_len": "i32", "stride_qs": "i32", "stride_qh": "i32", "stride_kb": "i32",
               "stride_kt": "i32", "stride_kh": "i32", "stride_vb": "i32", "stride_vt": "i32", "stride_vh": "i32",
               "stride_bts": "i32", "stride_os": "i32", "stride_oh": "i32", "stride_oc": "i32", "stride_ls": "i32"}
        const = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1, "BLOCK_SIZE": bs,
                 "BLOCK_N": t.block_n, "BLOCK_H": t.block_h, "BLOCK_D": t.block_d, "IS_DOT": t.is_dot,
                 "IS_DOT_F32": c_dt == "fp32", "HAS_SPLITS": True, "HAS_START": True}
        (const if one else sig)["stride_lh"] = 1 if one else "i32"
        for arg, val in (("G", G), ("n_hblocks", -(-G // t.block_h))):
            (const if val == 1 else sig)[arg] = val if val == 1 else "i32"
        rows.append(Variant("attention.triton_backend._paged_decode_split_kernel",
                            f"suffix G={G} D={D} block={bs} q={q_dt} cache={c_dt} one_split={one} dot={t.is_dot}",
                            sig, const, num_warps=t.num_warps))
    # prefix: (G, members M, D, block size, q dtype, cache dtype, one prefix split, one-block prefixes)
    # M x G rows: 8 -> 16 padded, 56 (Qwen2.5-7B's G=7, 8 samples) -> 64, 128 -> two programs of 64
    for G, M, D, bs, q_dt, c_dt, one, b1 in [
            (1, 8, 128, 16, "bf16", "bf16", True, False), (7, 8, 128, 16, "bf16", "bf16", False, False),
            (8, 16, 64, 16, "fp16", "fp16", False, False), (4, 16, 128, 16, "bf16", "bf16", True, True),
            (2, 4, 256, 16, "bf16", "bf16", False, False), (7, 5, 80, 1, "fp32", "bf16", False, False),
            (4, 16, 128, 16, "fp32", "fp32", False, False), (1, 2, 64, 3, "fp32", "fp32", True, True),
            (16, 4, 256, 16, "fp32", "fp32", False, False), (2, 16, 256, 256, "fp16", "fp16", True, False)]:
        t = tc.prefix_tiles(M * G, D, torch_dtype[c_dt], interpret=False)
        sig = {"O": "*fp32", "LSE": "*fp32", "Q": p(q_dt), "K_CACHE": p(c_dt), "V_CACHE": p(c_dt),
               "GROUP_ROWS": "*i64", "GROUP_VALID": "*u8", "GROUP_BLOCKS": "*i64", "GROUP_NUM_BLOCKS": "*i64",
               "scale_log2": "fp32", "D": "i32", "M": "i32", "split_len": "i32", "stride_qs": "i32",
               "stride_qh": "i32", "stride_kb": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vb": "i32",
               "stride_vt": "i32", "stride_vh": "i32", "stride_gr": "i32", "stride_gv": "i32", "stride_os": "i32",
               "stride_oh": "i32", "stride_oc": "i32", "stride_ls": "i32"}
        const = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1, "BLOCK_SIZE": bs,
                 "BLOCK_N": t.block_n, "BLOCK_R": t.block_r, "BLOCK_D": t.block_d, "IS_DOT_F32": c_dt == "fp32"}
        for arg, val in (("G", G), ("n_rblocks", -(-(M * G) // t.block_r)), ("stride_lh", 1 if one else 2),
                         ("stride_gb", 1 if b1 else 2)):  # 1 is a constexpr at launch
            (const if val == 1 else sig)[arg] = val if val == 1 else "i32"
        rows.append(Variant("attention.triton_cascade._shared_prefix_kernel",
                            f"G={G} M={M} D={D} block={bs} q={q_dt} cache={c_dt} one_split={one} one_block={b1} "
                            f"BLOCK_R={t.block_r} BLOCK_N={t.block_n}", sig, const, num_warps=t.num_warps))
    # merge: (D, out dtype, one prefix split, one suffix split)
    for D, dt, one_p, one_s in [(128, "bf16", True, True), (64, "fp16", False, False), (256, "fp32", True, False),
                                (80, "bf16", False, True)]:
        block_d = max(16, V.triton.next_power_of_2(D))
        sig = {"OUT": p(dt), "O_PREFIX": "*fp32", "LSE_PREFIX": "*fp32", "O_SUFFIX": "*fp32", "LSE_SUFFIX": "*fp32",
               "CONTEXT_LENS": "*i32", "START_BLOCKS": "*i64", "D": "i32", "prefix_split_len": "i32",
               "split_len": "i32", "stride_outs": "i32", "stride_outh": "i32", "stride_pos": "i32",
               "stride_poh": "i32", "stride_poc": "i32", "stride_pls": "i32", "stride_sos": "i32",
               "stride_soh": "i32", "stride_soc": "i32", "stride_sls": "i32"}
        const = {"stride_outd": 1, "BLOCK_SIZE": 16, "BLOCK_D": block_d}
        for arg, one in (("stride_plh", one_p), ("stride_slh", one_s)):
            (const if one else sig)[arg] = 1 if one else "i32"
        rows.append(Variant("attention.triton_cascade._cascade_merge_kernel",
                            f"D={D} out={dt} one_prefix_split={one_p} one_suffix_split={one_s}", sig, const,
                            num_warps=1 if block_d <= 64 else 2))
    return rows


def sampling_variants(V) -> list[Variant]:
    """The fused sampler: each logits dtype, a vocabulary of one tile and of many, an int64 row stride."""
    rows = []
    for dt, vocab, stride in [("fp32", 151936, "i32"), ("bf16", 151936, "i32"), ("fp16", 1000, "i32"),
                              ("bf16", 128256, "i64")]:
        sig = {"TOKENS": "*i64", "LOGPROBS": "*fp32", "LOGITS": p(dt), "TEMPERATURE": "*fp32", "KA": "*i64",
               "KB": "*i64", "V": "i32", "stride_s": stride}
        const = {"U_SCALE": V.sampling._U_SCALE, "BLOCK_V": min(V.sampling.BLOCK_V, V.triton.next_power_of_2(vocab))}
        rows.append(Variant("sampling._race_sample_kernel", f"logits={dt} V={vocab} stride={stride}", sig, const))
    return rows


def rms_norm_variants(V) -> list[Variant]:
    """The generator's norms with the tiles ``kernels.rms_norm.tiles`` picks: hidden-state rows (2-D input: ``K = 1``,
    a constexpr at launch), Qwen3's per-head rows (``K = H``), one row (``M = 1``), the training forward that saves
    ``rstd``, a float32 weight on bf16 rows (float32 output), the widest rows, and int64 strides."""
    rn = V.rms_norm
    rows = []
    # (C, M, K, x dtype, weight dtype, HAS_RESIDUAL, HAS_RSTD, row strides)
    cases = [
        (896, 256, 1, "bf16", "bf16", True, False, "i32"),  # Qwen2.5-0.5B decode, add + norm
        (896, 256, 1, "bf16", "bf16", False, False, "i32"),
        (4096, 1, 1, "fp16", "fp16", True, False, "i32"),  # one row
        (128, 4096, 16, "bf16", "bf16", False, False, "i32"),  # Qwen3 q norm over [N, 16, 128] heads
        (704, 300, 1, "bf16", "fp32", True, False, "i32"),  # promoted output
        (2048, 8192, 1, "fp32", "fp32", False, True, "i64"),  # training forward, int64 row stride
        (16384, 64, 1, "bf16", "bf16", True, False, "i32"),
        (65536, 4, 1, "fp32", "fp32", False, False, "i32"),  # MAX_COLUMNS
        (1, 7, 1, "fp16", "fp16", True, False, "i32"),  # C == 1: a constexpr too
    ]
    for C, M, K, x_dt, w_dt, has_res, has_rstd, strides in cases:
        block_r, block_c, num_warps = rn.tiles(C, M)
        y_dt = "fp32" if "fp32" in (x_dt, w_dt) else x_dt
        sig = {"Y": p(y_dt), "RES_OUT": p(x_dt if has_res else y_dt), "RSTD": "*fp32" if has_rstd else p(y_dt),
               "X": p(x_dt), "RES": p(x_dt), "W": p(w_dt), "eps": "fp32"}
        if C > 1:
            sig.update(stride_x0=strides, stride_r0=strides)
        const = {"HAS_RESIDUAL": has_res, "HAS_RSTD": has_rstd, "BLOCK_R": block_r, "BLOCK_C": block_c}
        for arg, val in (("M", M), ("C", C), ("K", K)):
            (const if val == 1 else sig)[arg] = 1 if val == 1 else "i32"
        # K = 1: x3 is x[:, None, :], whose unit dim has stride C; with C = 1 the row stride is 1 too
        for arg in ("stride_x1", "stride_r1") + (("stride_x0", "stride_r0") if C == 1 else ()):
            (const if C == 1 else sig)[arg] = 1 if C == 1 else "i32"
        rows.append(Variant("rms_norm._rms_norm_fwd_kernel",
                            f"C={C} M={M} K={K} x={x_dt} w={w_dt} residual={has_res} rstd={has_rstd} "
                            f"strides={strides} BLOCK_R={block_r} BLOCK_C={block_c}", sig, const, num_warps=num_warps))
    for C, M, K, x_dt, w_dt in [(2048, 8192, 1, "bf16", "bf16"), (128, 512, 8, "fp32", "fp32"),
                                (896, 300, 1, "fp16", "fp32"), (16384, 64, 1, "bf16", "bf16")]:
        block_r, block_c, num_warps = rn.tiles(C, M)
        sig = {"DX": p(x_dt), "DW_PART": "*fp32", "DY": p("fp32" if w_dt == "fp32" else x_dt), "X": p(x_dt),
               "W": p(w_dt), "RSTD": "*fp32", "M": "i32", "C": "i32", "rows_per_program": "i32",
               "stride_x0": "i32", "stride_x1": "i32"}
        const = {"BLOCK_R": block_r, "BLOCK_C": block_c}
        (const if K == 1 else sig)["K"] = 1 if K == 1 else "i32"
        rows.append(Variant("rms_norm._rms_norm_bwd_kernel", f"C={C} M={M} K={K} x={x_dt} w={w_dt} "
                            f"BLOCK_R={block_r} BLOCK_C={block_c}", sig, const, num_warps=num_warps))
    return rows


def silu_mul_variants(V) -> list[Variant]:
    """SwiGLU: separate gate/up outputs (row stride I) and the halves of a fused [N, 2I] projection (stride 2I),
    each dtype, a one-column tile (I = 1, a constexpr)."""
    sm = V.silu_mul
    rows = []
    for I, dt, fused in [(4864, "bf16", False), (8192, "fp16", True), (37, "fp32", False), (1, "bf16", False)]:
        block = min(sm._BLOCK, V.triton.next_power_of_2(I))
        for kernel, outs in (("_silu_and_mul_fwd_kernel", ("Y",)), ("_silu_and_mul_bwd_kernel", ("DGATE", "DUP"))):
            sig = {name: p(dt) for name in outs} | {"GATE": p(dt), "UP": p(dt)}
            if kernel.endswith("bwd_kernel"):
                sig["DY"] = p(dt)
            const = {"BLOCK": block}
            if I == 1:  # and both row strides are 1 too
                const.update(I=1, stride_g=1, stride_u=1)
            else:
                sig.update(I="i32", stride_g="i32", stride_u="i32")
            rows.append(Variant(f"silu_mul.{kernel}", f"I={I} {dt} fused_halves={fused} BLOCK={block}", sig, const))
    return rows


def rope_cache_variants(V) -> list[Variant]:
    """RoPE + paged-cache write with the tiles ``kernels.rope_cache.tiles`` picks, for common checkpoints' heads:
    Qwen2.5-0.5B (14 / 2, D 64), Llama-3-8B (32 / 8, D 128), MQA (H_kv = 1, a constexpr) with one-token blocks
    (block_size = 1, a constexpr), a float32 cache under a bf16 model with D 80 (pairs padded to 64), strided q/k/v
    views of a fused qkv output, and int64 cache strides."""
    rc = V.rope_cache
    rows = []
    # (H, H_kv, D, block_size, model dtype, cache dtype, contiguous q/k/v, cache strides)
    cases = [(14, 2, 64, 16, "bf16", "bf16", True, "i32"), (32, 8, 128, 16, "fp16", "fp16", True, "i32"),
             (16, 1, 128, 1, "fp32", "fp32", True, "i32"), (20, 4, 80, 32, "bf16", "fp32", True, "i32"),
             (16, 2, 128, 256, "bf16", "bf16", False, "i64")]
    for H, H_kv, D, bs, dt, c_dt, contiguous, c_strides in cases:
        block_hq, block_hkv, block_half = rc.tiles(H, H_kv, D, interpret=False)
        sig = {"Q": p(dt), "K": p(dt), "V": p(dt), "COS": p(dt), "SIN": p(dt), "K_CACHE": p(c_dt),
               "V_CACHE": p(c_dt), "SLOTS": "*i64", "H": "i32", "HALF": "i32"}
        const = {"BLOCK_HQ": block_hq, "BLOCK_HKV": block_hkv, "BLOCK_HALF": block_half}
        for arg, val in (("H_kv", H_kv), ("block_size", bs)):
            (const if val == 1 else sig)[arg] = 1 if val == 1 else "i32"
        for t in ("q", "k", "v"):
            sig[f"stride_{t}n"] = sig[f"stride_{t}h"] = "i32"
            const[f"stride_{t}d"] = 1
        for t in ("c", "s"):
            sig[f"stride_{t}n"] = "i32"
            const[f"stride_{t}d"] = 1
        for t in ("kc", "vc"):
            sig[f"stride_{t}b"] = c_strides
            sig[f"stride_{t}t"] = sig[f"stride_{t}h"] = "i32"
            const[f"stride_{t}d"] = 1
        rows.append(Variant("rope_cache._rope_and_cache_kernel",
                            f"H={H} H_kv={H_kv} D={D} block={bs} {dt} cache={c_dt} "
                            f"{'contig' if contiguous else 'qkv views'} cache strides={c_strides} "
                            f"BLOCK_HQ={block_hq} BLOCK_HKV={block_hkv}", sig, const,
                            options={"enable_fp_fusion": False}))  # as the launcher: eager's roundings, no FMA
    return rows


BUILDERS = (kl_variants, logprobs_variants, loss_agg_variants, ppo_variants, value_variants, gae_variants,
            advantages_variants, dpo_variants, reward_variants, attention_variants, sampling_variants,
            rms_norm_variants, silu_mul_variants, rope_cache_variants)


# ------------------------------------------------------------------------------------------------------- machinery
# The packages scanned for @triton.jit, by the prefix of their kernels' names: ``kl._kl_penalty_fwd_kernel`` lives in
# ``kernels.kl``, ``attention.triton_backend._paged_decode_split_kernel`` in
# ``engine.generation.attention.triton_backend``.
PACKAGES = {"": "kernels", "attention": "engine.generation.attention"}


def module_path(name: str) -> str:
    """``"kl"`` -> ``"kernels.kl"``, ``"attention.triton_backend"`` -> ``"engine.generation.attention.triton_backend"``
    (the module of a kernel named ``<name>.<function>``)."""
    prefix, _, mod = name.rpartition(".")
    return f"{PACKAGES[prefix]}.{mod}"


def kernel_modules() -> list[str]:
    """Every module of the scanned packages (``kl``, ``logprobs``, ..., ``attention.triton_backend``), by short name."""
    names = []
    for prefix, package in PACKAGES.items():
        pkg = importlib.import_module(package)
        names += [f"{prefix}.{m.name}" if prefix else m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if m.name != "__main__"]  # kernels/__main__.py is the extension's build command, not a module
    return sorted(names)


class _Modules:
    """``V.kl``, ``V.logprobs``, ``V.attention.triton_backend``, ...: the kernel modules, for launcher constants and
    helpers (block sizes)."""

    def __init__(self):
        from types import SimpleNamespace

        import torch
        import triton

        self.torch = torch
        self.triton = triton
        for name in kernel_modules():
            *parents, leaf = name.split(".")
            ns = self
            for part in parents:
                if not hasattr(ns, part):
                    setattr(ns, part, SimpleNamespace())
                ns = getattr(ns, part)
            setattr(ns, leaf, importlib.import_module(module_path(name)))


def build_variants() -> list[Variant]:
    mods = _Modules()
    return [v for build in BUILDERS for v in build(mods)]


def resolve(kernel: str):
    module, fn = kernel.rsplit(".", 1)
    return getattr(importlib.import_module(module_path(module)), fn)


def full_signature(v: Variant, fn) -> tuple[dict, dict]:
    """``(signature, constexprs)`` over every argument of ``fn``, in order; raises ``ValueError`` on a table error."""
    names = list(fn.arg_names)
    unknown = (set(v.sig) | set(v.const)) - set(names)
    both = set(v.sig) & set(v.const)
    missing = [n for n in names if n not in v.sig and n not in v.const]
    declared = {names[i] for i in getattr(fn, "constexprs", [])}
    not_const = sorted(declared - set(v.const))
    problems = [f"{what}: {sorted(s)}" for what, s in (("unknown arguments", unknown), ("typed and constant", both),
                                                        ("untyped arguments", missing),
                                                        ("constexpr without a value", not_const)) if s]
    if problems:
        raise ValueError(f"{v.label}: " + "; ".join(problems))
    signature = {n: ("constexpr" if n in v.const else v.sig[n]) for n in names}
    return signature, dict(v.const)


def check_table(variants: list[Variant]) -> list[str]:
    """Table errors: bad rows, and @triton.jit functions of the scanned packages with no variant that are not device
    functions."""
    from triton.runtime.jit import JITFunction

    errors = []
    for v in variants:
        try:
            full_signature(v, resolve(v.kernel))
        except (ValueError, AttributeError) as exc:
            errors.append(str(exc))
    covered = {v.kernel for v in variants}
    for name in kernel_modules():
        mod = importlib.import_module(module_path(name))
        for attr, obj in vars(mod).items():
            key = f"{name}.{attr}"
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__ and key not in covered \
                    and key not in DEVICE_FUNCTIONS:
                errors.append(f"{mod.__file__}: @triton.jit {attr} has no variant in tests/gpu_compile_check.py "
                              f"(add one, or list it in DEVICE_FUNCTIONS if it is only called from kernels)")
    return errors


def compile_variant(v: Variant) -> tuple[bool, float, str]:
    """Compile one variant for sm_90; returns ``(ok, seconds, error or summary)``. Runs in a worker process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = resolve(v.kernel)
        signature, constexprs = full_signature(v, fn)
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": v.num_warps, **v.options})
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        md = compiled.metadata
        info = f"warps={md.num_warps} shared={md.shared}B"
        return True, time.perf_counter() - t0, info
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        # Triton's CompilationError carries the kernel source around the failing line; ptxas errors carry its log.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"raised at {where.filename}:{where.lineno}\n" + "".join(traceback.format_exception_only(exc))
        return False, time.perf_counter() - t0, detail


def _worker_init(cache_dir: str | None):
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    import kernels  # noqa: F401 - pay the torch/triton import once per worker


def preflight() -> str | None:
    """Why nothing can be compiled here (triton, its NVIDIA backend or ptxas missing), or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if backends and "nvidia" not in backends:
        return f"triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas
        return None if ptxas.path else "ptxas not found"
    except AttributeError:  # older triton without knobs: the first compile reports a missing ptxas
        return None
    except RuntimeError as exc:  # "Cannot find ptxas"
        return f"ptxas is unavailable ({exc}); set TRITON_PTXAS_PATH to a CUDA ptxas that supports sm_90"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", "--filter", default="", help="only variants whose kernel or name contains this")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    ap.add_argument("--fresh-cache", action="store_true", help="compile in an empty temporary Triton cache")
    args = ap.parse_args(argv)

    reason = preflight()
    if reason:
        print(f"SKIP: {reason}")
        return SKIP_RC
    import triton

    variants = build_variants()
    errors = check_table(variants)
    if errors:
        print("variant table is inconsistent with the kernels:", *errors, sep="\n  ")
        return TABLE_RC
    variants = [v for v in variants if args.filter in v.label]
    if args.list:
        for v in variants:
            print(f"{v.label} num_warps={v.num_warps}")
        print(f"{len(variants)} variants")
        return 0

    from triton import knobs

    ptxas = knobs.nvidia.ptxas if hasattr(knobs, "nvidia") else None
    print(f"triton {triton.__version__}, target {TARGET[0]} sm_{TARGET[1]}, "
          f"ptxas {getattr(ptxas, 'version', '?')} ({getattr(ptxas, 'path', '?')}), "
          f"{len(variants)} variants, {args.jobs} jobs", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="triton-cache-") if args.fresh_cache else None
    t0 = time.perf_counter()
    failures = []
    width = max((len(v.label) for v in variants), default=0)
    ctx = multiprocessing.get_context("spawn")  # no fork after LLVM/MLIR initialisation in the parent
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx, initializer=_worker_init,
                                initargs=(tmp.name if tmp else None,)) as pool:
        for v, (ok, secs, info) in zip(variants, pool.map(compile_variant, variants)):
            print(f"{'ok  ' if ok else 'FAIL'} {v.label:<{width}} {secs:6.2f}s  {info if ok else ''}".rstrip(),
                  flush=True)
            if not ok:
                failures.append((v, info))
    total = time.perf_counter() - t0
    if tmp:
        tmp.cleanup()
    for v, info in failures:
        print(f"\n=== FAILED: {v.label} (num_warps={v.num_warps})\nsignature: {v.sig}\nconstexprs: {v.const}\n{info}")
    kernels_seen = len({v.kernel for v in variants})
    print(f"\n{len(variants) - len(failures)}/{len(variants)} variants of {kernels_seen} kernels compiled for "
          f"sm_{TARGET[1]} in {total:.1f}s wall" + (f"; {len(failures)} FAILED" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
