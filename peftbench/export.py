"""`peftbench export`: write a finished run's merged model as a stock open_clip checkpoint.

The run's method is rebuilt from its record (the resolved method config, the same backbone and
weights), its saved trainable state is loaded, and `merge()` folds it into a plain CLIP. The file
holds the open_clip state dict with exactly the original keys and shapes, so stock open_clip loads it:

    open_clip.create_model_and_transforms(ARCH, pretrained="model.safetensors")
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from peftbench.cli import command, out
from peftbench.errors import UsageError

SUFFIXES = (".safetensors", ".pt", ".bin")


def find_record(store, prefix: str) -> dict[str, Any]:
    """The record to export for a config-hash prefix (its cell's latest ok record)."""
    prefix = prefix.strip().lower()
    if not prefix:
        raise UsageError("RUN_HASH_PREFIX is empty; `peftbench show RESULTS_DIR` lists run hashes")
    cells = store.latest_by_cell()
    matches = sorted(h for h in cells if h.startswith(prefix))
    if not matches:
        raise UsageError(
            f"no run with hash prefix {prefix!r} in {store.root} (`peftbench show {store.root}` lists them)"
        )
    if len(matches) > 1:
        shown = ", ".join(h[:12] for h in matches[:5])
        raise UsageError(
            f"hash prefix {prefix!r} is ambiguous ({len(matches)} runs: {shown}); give more characters"
        )
    h = matches[0]
    ok = [r for r in store.cell_records(h) if r.get("status") == "ok"]
    if not ok:
        latest = cells[h]
        raise UsageError(
            f"run {h[:12]} {latest.get('status')} ({latest.get('error', 'no error recorded')}); "
            "nothing to export"
        )
    return ok[-1]


def merged_backbone(store, record: dict[str, Any]):
    """Rebuild the record's method, load its trainable state and merge it (a plain Backbone)."""
    from peftbench.config import build_config
    from peftbench.registry import get_method, load_plugins
    from peftbench.runner import get_backbone, weights_identity

    load_plugins()
    spec = record["spec"]
    method_cls = get_method(spec["method"])
    if not method_cls.mergeable:
        raise UsageError(
            f"run {record['config_hash'][:12]}: method {spec['method']!r} cannot be merged into a plain CLIP "
            "(mergeable=False), so there is no stock open_clip model to export"
        )
    try:
        state = store.load_state(record)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    state.pop("_empty", None)
    backbone = get_backbone(spec["backbone"], spec["pretrained"], torch.device("cpu"))
    recorded = record["resolved"]["backbone"]["weights"]
    if weights_identity(backbone.info.pretrained) != recorded:
        raise UsageError(
            f"run {record['config_hash'][:12]} was trained on weights {recorded}, but {spec['backbone']} "
            f"now loads {weights_identity(backbone.info.pretrained)}; restore the original weights file"
        )
    config = build_config(
        method_cls.Config, record["resolved"]["method"]["config"], what=f"{spec['method']} config"
    )
    classnames = list((record.get("task_info") or {}).get("classnames") or ["class"])
    model = method_cls(backbone.copy(), classnames, config)
    model.load_trainable_state_dict(state)
    model.eval()
    return model.merge()


def save_checkpoint(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@command("export")
def export(
    run_hash: Annotated[str, typer.Argument(help="A prefix of the run's config hash (`peftbench show`).")],
    results_dir: Annotated[Path, typer.Option(help="The results store.")] = Path("results"),
    out_path: Annotated[Path, typer.Option("--out", help="Output file: .safetensors, .pt or .bin.")] = Path(
        "model.safetensors"
    ),
) -> None:
    """Write a finished run's merged model as a stock open_clip checkpoint."""
    from peftbench.results import ResultStore

    if out_path.suffix not in SUFFIXES:
        raise UsageError(f"--out {out_path}: the file name must end in one of {', '.join(SUFFIXES)}")
    if not results_dir.is_dir():
        raise UsageError(f"results store not found: {results_dir} (pass --results-dir)")
    store = ResultStore(results_dir)
    record = find_record(store, run_hash)
    plain = merged_backbone(store, record)
    save_checkpoint(plain.state_dict_for_export(), out_path)
    arch = record["spec"]["backbone"]
    out.print(
        f"wrote {out_path}: {record['spec']['method']} run {record['config_hash'][:12]} merged into a plain "
        f"{arch} ({len(plain.state_dict_for_export())} tensors). Load it with "
        f"open_clip.create_model_and_transforms({arch!r}, pretrained={str(out_path)!r}) "
        "(register a shipped backbone's config JSON with open_clip.add_model_config first)"
    )
