"""The generator's forward pass for the Llama family (Llama 2/3, Qwen2/2.5, Qwen3, Mistral without sliding window),
computed on the Hugging Face module's own parameters.

``LlamaFamilyModel(hf_model)`` keeps references to the HF submodules and reads their ``.weight``/``.bias`` at every
call: nothing is copied, so after the trainer's optimizer step (or a ``load_state_dict``) the next rollout uses the
new weights. It replaces HF's batch/padding/DynamicCache forward with the generator's packed layout: the ``N`` new
tokens of all sequences in one ``[N, hidden]`` matrix, K/V in the paged cache, attention by an ``AttentionBackend``.
Each operation mirrors HF's modelling code in the same dtypes and order (RMSNorm in float32 rounded back to the
model dtype, RoPE cos/sin computed in float32 from the HF rotary module's ``inv_freq``/``attention_scaling`` then
rounded to the model dtype), so in float32 the logits agree with ``hf_model(input_ids).logits`` to ~1e-6.

Per layer the elementwise work runs in fused ops of ``kernels`` (Triton on CUDA, their PyTorch references, HF op for
op, on the CPU): ``fused_add_rms_norm`` (each residual add with the RMSNorm after it; the residual stream stays in the
model dtype as in HF), ``silu_and_mul`` (the SwiGLU activation, when ``config.hidden_act == "silu"``) and, when the
attention backend can skip its own K/V write (``accepts_kv_written``), ``rope_and_cache`` (RoPE of q and k plus the
write of k and v into the paged cache). A layer is then: norm+add, q/k/v linears, (Qwen3 q/k norms), rope+cache,
attention, o_proj, add+norm, gate/up linears, silu*mul, down_proj.

Dims: ``N`` new tokens in the step, ``S`` sequences, ``H`` query heads, ``H_kv`` K/V heads, ``D`` head dim,
``V`` vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fused_linear_logprobs import _matmul_fp32
from kernels.rms_norm import fused_add_rms_norm, rms_norm
from kernels.rope_cache import apply_rope_ref as apply_rope
from kernels.rope_cache import rope_and_cache
from kernels.silu_mul import silu_and_mul

if TYPE_CHECKING:  # engine.generation imports this module; no import cycle at run time
    from engine.generation.attention import AttentionBackend, AttentionMetadata

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# RoPE variants whose inv_freq does not depend on the sequence length ("dynamic" and "longrope" rescale it per call)
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def _linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def _bias_or_zeros(module: nn.Linear) -> torch.Tensor:
    if module.bias is not None:
        return module.bias
    return torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device)


def _concat_linear(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A copy of the modules' weights stacked along the output dim (``[sum out, in]``), and of their biases (zeros
    for a module without one) or None when none has a bias: one GEMM computes all their outputs."""
    weight = torch.cat([m.weight.detach() for m in modules])
    has_bias = any(m.bias is not None for m in modules)
    bias = torch.cat([_bias_or_zeros(m).detach() for m in modules]) if has_bias else None
    return weight, bias


def unsupported_reason(hf_model) -> str | None:
    """Why ``LlamaFamilyModel`` cannot run ``hf_model``, or ``None`` when it can."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    max_pos = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    windowed = (model_type == "mistral" or getattr(config, "use_sliding_window", False)
                or "sliding_attention" in (getattr(config, "layer_types", None) or ()))
    if windowed and window is not None and window < max_pos:
        return (f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos}) is not "
                "supported")
    base = getattr(hf_model, "model", None)
    if base is None or hf_model.get_output_embeddings() is None:
        return f"{type(hf_model).__name__} is not a *ForCausalLM with a .model and an LM head"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"{type(base).__name__} has no .{name}"
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} is not supported (only {_STATIC_ROPE_TYPES})"
    for i, layer in enumerate(base.layers):
        for name in _LINEARS:
            module = layer.get_submodule(name)
            if type(module) is not nn.Linear:
                return (f"layers.{i}.{name} is a {type(module).__name__}, not a plain nn.Linear (merge LoRA "
                        "adapters / dequantize first)")
    return None


class LlamaFamilyModel:
    """Paged-KV inference forward over an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
    ``MistralForCausalLM`` (full attention), sharing its parameters (no copy).

    ``fuse_projections=True`` trades memory for fewer GEMMs: a concatenated copy of each layer's q/k/v weights and
    of its gate/up weights (about two thirds of the model's weight bytes again) turns five projections into two;
    ``sync_fused_weights`` refreshes the copies, in place, whenever a source weight changed (checked at every forward
    outside CUDA-graph capture). Whether it pays is measured by ``bench/bench_generate.py --compare-fused-projections``.

    Attributes: ``num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size, max_position_embeddings``
    (from the config), ``dtype, device`` (of the live embedding weight), ``scale`` (softmax scale, the HF attention
    module's ``scaling``: ``head_dim ** -0.5``), ``eps`` (``config.rms_norm_eps``).

    Raises ``ValueError`` naming the reason when ``supports(hf_model)`` is false.
    """

    def __init__(self, hf_model: nn.Module, *, fuse_projections: bool = False):
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise ValueError(f"LlamaFamilyModel cannot run this model: {reason}")
        config = hf_model.config
        self.hf_model = hf_model
        self.config = config
        base = hf_model.model
        self._embed = base.embed_tokens
        self._layers = list(base.layers)
        self._norm = base.norm
        self._rotary = base.rotary_emb
        self.num_layers = len(self._layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        attn = self._layers[0].self_attn
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.max_position_embeddings = config.max_position_embeddings
        self.eps = config.rms_norm_eps
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self._silu = getattr(config, "hidden_act", None) == "silu"  # SwiGLU: the fused silu_and_mul applies
        self.fuse_projections = fuse_projections
        self._fused: list[dict[str, torch.Tensor | None]] = []
        self._fused_versions: tuple | None = None

    # ------------------------------------------------------------------------------------------- fused projections
    def _projection_sources(self):
        """Per layer, the ``(name, [linear modules])`` whose weights are concatenated: q/k/v and gate/up."""
        for layer in self._layers:
            attn, mlp = layer.self_attn, layer.mlp
            yield [("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("gate_up", [mlp.gate_proj, mlp.up_proj])]

    def sync_fused_weights(self) -> bool:
        """With ``fuse_projections``: make the concatenated q/k/v and gate/up weight copies equal the HF modules'
        weights, copying in place (the buffers keep their addresses, which a CUDA graph has captured) only when a
        source tensor changed since the last sync: moved (``data_ptr``) or written in place (its ``_version``
        counter, which optimizer steps and ``load_state_dict`` advance). Returns whether it copied. Host work: one
        pass over the projection tensors; call it outside CUDA-graph capture (the forward does, when not capturing).
        A no-op without ``fuse_projections``."""
        if not self.fuse_projections:
            return False
        sources = [[m.weight for m in mods] + [m.bias for m in mods if m.bias is not None]
                   for layer in self._projection_sources() for _, mods in layer]
        versions = tuple((t.data_ptr(), t._version) for ts in sources for t in ts)
        if versions == self._fused_versions:
            return False
        with torch.no_grad():
            if not self._fused:
                self._fused = [{name: _concat_linear(mods) for name, mods in layer}
                               for layer in self._projection_sources()]
            else:
                for fused, layer in zip(self._fused, self._projection_sources()):
                    for name, mods in layer:
                        weight, bias = fused[name]
                        torch.cat([m.weight for m in mods], out=weight)
                        if bias is not None:
                            torch.cat([_bias_or_zeros(m) for m in mods], out=bias)
        self._fused_versions = versions
        return True

    @staticmethod
    def supports(hf_model) -> bool:
        """True when ``hf_model`` is a Llama-family causal LM this class runs exactly (see ``unsupported_reason``)."""
        return unsupported_reason(hf_model) is None

    @property
    def dtype(self) -> torch.dtype:
        return self._embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._embed.weight.device

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [N]`` int64 -> ``cos, sin [N, D]`` in ``dtype``, computed in float32 as HF's rotary module does
        (its own ``inv_freq`` buffer, so llama3/linear/yarn scaling match, times its ``attention_scaling``)."""
        inv_freq = self._rotary.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self._rotary.attention_scaling
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """One generator step over the packed new tokens of all sequences.

        Args:
            input_ids: ``[N]`` int64, the new tokens (sequence ``s`` owns rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``).
            positions: ``[N]`` int64, each token's position in its sequence.
            kv_caches: one ``(k_cache, v_cache)`` per layer, each ``[num_blocks, block_size, H_kv, D]``; this step's
                K/V are written into them in place (by ``kernels.rope_cache`` when ``backend.accepts_kv_written``,
                else by ``backend``).
            meta: the step's ``AttentionMetadata``.
            backend: the ``AttentionBackend`` that attends (and writes K/V unless told they are written).

        Returns: ``[N, hidden_size]`` hidden states after the final norm, in the model dtype (feed the rows whose
        logits are needed to ``compute_logits``). Builds no autograd graph.
        Raises ``ValueError`` when ``kv_caches`` does not have one entry per layer.
        """
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, the model {self.num_layers} layers")
        N, H, H_kv, D, eps = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        # the backend skips its own K/V write when rope_and_cache has done it (see AttentionBackend.forward)
        fused_kv = getattr(backend, "accepts_kv_written", False)
        # each layer's input norm is fused with the residual add that ends the previous layer; the last add with the
        # final norm
        norm_weights = [layer.input_layernorm.weight for layer in self._layers] + [self._norm.weight]
        if self.fuse_projections:
            if not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
                self.sync_fused_weights()
            elif not self._fused:  # under capture the caller syncs before every replay (StaticDecoder.step)
                raise RuntimeError("sync_fused_weights() must run before a CUDA graph captures the forward")
        h = F.embedding(input_ids, self._embed.weight)
        cos, sin = self.rope(positions, h.dtype)
        x = rms_norm(h, norm_weights[0], eps)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self._layers, kv_caches)):
            attn, mlp = layer.self_attn, layer.mlp
            if self.fuse_projections:  # one GEMM; q, k, v are column views of its output
                qkv = F.linear(x, *self._fused[i]["qkv"])
                q = qkv[:, :H * D].view(N, H, D)
                k = qkv[:, H * D:(H + H_kv) * D].view(N, H_kv, D)
                v = qkv[:, (H + H_kv) * D:].view(N, H_kv, D)
            else:
                q = _linear(x, attn.q_proj).view(N, H, D)
                k = _linear(x, attn.k_proj).view(N, H_kv, D)
                v = _linear(x, attn.v_proj).view(N, H_kv, D)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head, before RoPE
                q = rms_norm(q, attn.q_norm.weight, eps)
                k = rms_norm(k, attn.k_norm.weight, eps)
            if fused_kv:
                q = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
                o = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale, kv_written=True)
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                o = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
            x, h = fused_add_rms_norm(_linear(o.reshape(N, H * D), attn.o_proj), h,
                                      layer.post_attention_layernorm.weight, eps)
            if self.fuse_projections:
                gate_up = F.linear(x, *self._fused[i]["gate_up"])
                inter = gate_up.shape[1] // 2
                gate, up = gate_up[:, :inter], gate_up[:, inter:]
            else:
                gate, up = _linear(x, mlp.gate_proj), _linear(x, mlp.up_proj)
            act = silu_and_mul(gate, up) if self._silu else mlp.act_fn(gate) * up
            x, h = fused_add_rms_norm(_linear(act, mlp.down_proj), h, norm_weights[i + 1], eps)
        return x

    __call__ = forward

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [S, hidden_size]`` (any float dtype) -> ``[S, V]`` float32 logits of the LM head (tied or not, plus
        its bias if any), accumulated in float32. For bf16/fp16 weights on the CPU both operands are upcast (a float32
        copy of the ``[V, hidden]`` weight per call); on CUDA ``torch.mm(..., out_dtype=torch.float32)`` reads the
        low-precision weight directly (``kernels.fused_linear_logprobs._matmul_fp32``)."""
        head = self.hf_model.get_output_embeddings()
        logits = _matmul_fp32(hidden, head.weight.t())
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.float()
        return logits
