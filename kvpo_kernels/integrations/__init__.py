"""Adapters for model libraries. ``kvpo_kernels.integrations.diffusers``: streaming rollouts of diffusers'
``WanTransformer3DModel`` over the group KV cache (imported on demand, so the kernels do not need diffusers)."""
