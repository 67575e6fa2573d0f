"""Adapters that plug the engine into other training libraries. Each submodule imports its library on import and
nothing here imports it eagerly: ``engine.integrations.trl`` (TRL's ``GRPOTrainer``, ``pip install 'trl>=1.16'``)."""
