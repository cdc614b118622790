# On PYTHONPATH only for the "fused projections off" variant: load_model's fuse_projections becomes a no-op.
import star_lightning.models as _m

_m.fuse_projections = lambda model: 0
print("[fp_off] fuse_projections disabled", flush=True)
