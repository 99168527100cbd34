"""nora-serve's native adapter format (written by ``nora-train``, read by everything else).

A directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

``adapter_config.json``::

    {
      "format": "nora-serve", "format_version": 2,   # 1: the shared basis embedded (see below)
      "method": "nora",                  # a registered native method: lora, nora, loraxs, ...
      "r": 8,                            # rank; NoRA: outer rank; dyrank: start rank r0
      "inner_r": 4,                      # a method's own keys (NoRA: the inner rank r')
      "lora_alpha": 16, "use_rslora": false,
      "scaling": 4.0,                    # s, recorded for readers; must equal the method's rule
      "target_modules": ["model.layers.0.self_attn.q_proj", ...],   # full module names
      "base_model_name_or_path": "...",
      "base_fingerprints": {"model.layers.0.self_attn.q_proj": "sha256:...", ...},
      "shared_basis": {"rule": "svd", "r": 8, "calibration": null, "fingerprint": "sha256:...",
                       "digest": "<32 hex>"},                 # format_version 2 only
      "rank_pattern": {"model.layers.0.self_attn.q_proj": 6, ...}   # dyrank: true rank per module
    }

Tensors, keyed ``<module>.<name>``, and the scale rule: each method's own, from the method
registry (:mod:`nora_serve.methods`): ``get_method(name).tensors`` in saving order (its
``shared`` pair is the basis, frozen), ``.scale`` (``alpha / r`` unless the method says
otherwise), and their shapes in the method's module docstring (``nora_serve/methods/<name>.py``);
``nora-train --help`` lists each method's delta and scale.

A method with an ``export`` (PEFT's DoRA) is saved in its own foreign format instead.

``format_version``: 1 embeds a shared-basis method's ``shared`` tensors (``outer_A``/``outer_B``,
IntTune's ``lora_A``/``lora_B``) in ``adapter_model.safetensors``, as every method without a
shared basis does; 2 (what ``nora-train`` writes for NoRA, LoRA-XS and IntTune) holds only the
adapter's own trained tensors, and ``shared_basis.digest`` names its basis file
(:mod:`.basis_file`: ``<store>/bases/<digest>.safetensors`` beside the adapter, ``--basis``, or
the user basis cache). Readers take both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nora_serve.methods import Factors, get_method, method_names

FORMAT = "nora-serve"
FORMAT_VERSION = 1  # tensors all in the adapter file (the default of a config that says none)
FORMAT_VERSION_CORES = 2  # shared-basis methods: own tensors only, the basis in its own file
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_CORES)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def method_scale(config: dict) -> float:
    """The scalar ``s`` of a native config, by the method's own rule."""
    return get_method(config["method"]).scale(config)


def module_factors(method: str, scale: float, t: dict[str, torch.Tensor]) -> Factors:
    """``ΔW = P Q`` of one module from its native tensors (``t`` keyed by tensor name)."""
    return get_method(method).factors(t, scale)


def module_core(method: str, scale: float, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The adapter's own ``r x r`` core ``C`` of a shared-basis method (``ΔW = B_sh C A_sh``,
    with ``A_sh, B_sh`` = the tensors named in the method's ``shared``)."""
    m = get_method(method)
    if m.core is None:
        raise ValueError(f"method {method!r} has no shared basis (shared-basis methods: "
                         f"{', '.join(method_names(shared_basis=True))})")
    return m.core(t, scale)


@dataclass
class NativeAdapter:
    """An adapter in the native format, in memory: ``tensors[module][name]``."""

    config: dict
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def scale(self) -> float:
        return method_scale(self.config)

    def factors(self, module: str) -> Factors:
        return module_factors(self.method, self.scale, self.tensors[module])

    def basis(self) -> dict[str, torch.Tensor]:
        """The shared basis as its file holds it: ``<module>.A`` / ``<module>.B`` (the method's
        ``shared`` pair), on the CPU."""
        spec = get_method(self.method)
        if not spec.shared_basis:
            raise ValueError(f"method {self.method!r} has no shared basis")
        a, b = spec.shared
        return {f"{m}.{k}": ts[n].detach().to("cpu").contiguous()
                for m, ts in self.tensors.items() for k, n in (("A", a), ("B", b))}

    def save(self, out: str | Path, overwrite: bool = False, *,
             bases_dir: str | Path | None = None) -> Path:
        """Write atomically: a failed save leaves nothing at ``out``. A ``format_version`` 2
        config (shared-basis methods) writes only the adapter's own tensors, records the basis
        digest, and first writes the basis to ``bases_dir`` (default: the store's ``bases/``,
        ``<out>/../bases``) unless it is there already, so an adapter never stands without it."""
        from safetensors.torch import save_file

        from .atomic import atomic_dir
        from .basis_file import basis_key, basis_meta, store_bases, write_basis

        cfg = dict(self.config)
        cfg.setdefault("format", FORMAT)
        cfg.setdefault("format_version", FORMAT_VERSION)
        cfg["scaling"] = method_scale(cfg)
        cfg["target_modules"] = sorted(self.tensors)
        spec = get_method(self.method)
        flat = {
            f"{m}.{n}": t.detach().to("cpu").contiguous()
            for m, ts in self.tensors.items()
            for n, t in ts.items()
        }
        if cfg["format_version"] == FORMAT_VERSION_CORES:
            if not spec.shared_basis:
                raise ValueError(f"format_version 2 is for shared-basis methods, not {self.method!r}")
            basis = self.basis()
            digest = basis_key(basis)
            sb = dict(cfg["shared_basis"])
            if sb.get("digest") not in (None, digest):
                raise ValueError(f"the adapter's basis is {digest}, its config says {sb['digest']}")
            cfg["shared_basis"] = {**sb, "digest": digest}
            flat = {k: v for k, v in flat.items() if k.rpartition(".")[2] not in spec.shared}
            write_basis(bases_dir if bases_dir is not None else store_bases(out), basis, basis_meta(cfg))
        export = get_method(self.method).export
        if export is not None:  # a method saved in its own (foreign) format
            cfg, flat = export(cfg, {m: {n: t.detach().to("cpu").contiguous() for n, t in ts.items()}
                                     for m, ts in self.tensors.items()})
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return Path(out)

