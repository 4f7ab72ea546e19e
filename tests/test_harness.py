"""Registry, configs, few-shot splits, depth mapping, schedules and determinism."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import pytest
from conftest import TINY

from peftbench.config import MethodConfig, build_config, parse_overrides
from peftbench.errors import ConfigError, UsageError
from peftbench.fewshot import sample_fewshot, split_path, write_or_check
from peftbench.method import coupled_image_block, map_depth, map_range
from peftbench.registry import METHODS, get_dataset, get_method, get_task, load_plugin_file
from peftbench.results import ResultStore
from peftbench.runner import RunSpec, execute, resolve
from peftbench.task import DataEnv
from peftbench.trainer import lr_factor, plan_steps


# ------------------------------------------------------------------ registry
@pytest.mark.parametrize(
    "lookup, name, fragment",
    [
        (get_method, "zeroshoot", "did you mean 'zeroshot'"),
        (get_task, "clasification", "did you mean 'classification'"),
        (lambda n: get_dataset("classification", n), "imagefoldr", "did you mean 'imagefolder'"),
    ],
)
def test_unknown_names_list_choices_and_closest(lookup, name, fragment):
    with pytest.raises(UsageError, match=fragment) as e:
        lookup(name)
    assert "choices:" in str(e.value)


def test_plugin_file_registers_a_method(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from peftbench.method import Method\n"
        "from peftbench.registry import register_method\n"
        "@register_method('_plugin_probe')\n"
        "class P(Method):\n    '''test plugin'''\n"
    )
    load_plugin_file(plugin)
    try:
        assert get_method("_plugin_probe").__doc__ == "test plugin"
    finally:
        METHODS.pop("_plugin_probe")
    with pytest.raises(UsageError, match="plugin file not found"):
        load_plugin_file(tmp_path / "nope.py")


# ------------------------------------------------------------------ configs
@dataclass(frozen=True)
class DemoConfig(MethodConfig):
    rank: int = 8
    layers: tuple[int, int] | None = None
    name: str = "x"


def test_overrides_are_typed_and_checked():
    cfg = build_config(DemoConfig, parse_overrides(["rank=4", "lr=1e-3", "layers=[2, 5]", "grad_clip=null"]))
    assert cfg.rank == 4 and cfg.lr == 1e-3 and cfg.layers == (2, 5) and cfg.grad_clip is None
    with pytest.raises(UsageError, match="did you mean 'rank'"):
        build_config(DemoConfig, {"rnak": 3})
    with pytest.raises(ConfigError, match="rank: expected an integer"):
        build_config(DemoConfig, {"rank": "eight"})
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        build_config(DemoConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="optimizer: must be one of"):
        build_config(DemoConfig, {"optimizer": "lion"})
    with pytest.raises(UsageError, match="key=value"):
        parse_overrides(["rank"])


# ------------------------------------------------------------------ few-shot splits
def pool(n_classes=3, per_class=10):
    return [(f"c{c}/img{i:02d}.png", c) for c in range(n_classes) for i in range(per_class)]


def test_fewshot_is_a_pure_function_of_dataset_shots_seed():
    a = sample_fewshot("ds", 4, 1, pool())
    assert a == sample_fewshot("ds", 4, 1, list(reversed(pool())))  # input order does not matter
    assert a != sample_fewshot("ds", 4, 2, pool())
    assert a != sample_fewshot("other", 4, 1, pool())
    assert len(a["train"]) == 12 and len(a["val"]) == 3 * 4  # min(K, 4) val per class from unused images
    train_paths = {p for p, _ in a["train"]}
    assert not train_paths & {p for p, _ in a["val"]}


def test_short_classes_keep_what_they_have_or_fail_when_strict():
    short_pool = pool(2, 10) + [("c9/only.png", 9)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        split = sample_fewshot("ds", 4, 1, short_pool)
    assert split["short_groups"] == {"9": 1} and any("fewer than 4" in str(x.message) for x in w)
    with pytest.raises(UsageError, match="--strict-shots"):
        sample_fewshot("ds", 4, 1, short_pool, strict=True)


def test_split_file_is_written_and_checked(tmp_path):
    split = sample_fewshot("ds", 2, 1, pool())
    path = split_path(tmp_path, "classification", "ds", 2, 1)
    sha = write_or_check(path, split)
    assert write_or_check(path, split) == sha
    on_disk = json.loads(path.read_text())
    assert on_disk["train"] == split["train"] and all(not p.startswith("/") for p, _ in on_disk["train"])
    with pytest.raises(UsageError, match="disagrees"):
        write_or_check(path, sample_fewshot("ds", 2, 2, pool()))


# ------------------------------------------------------------------ depth mapping
def test_depth_mapping_is_exact_on_12_blocks_and_scales():
    assert map_range(5, 12, 12) == (5, 12) and map_depth(9, 12) == 9
    assert map_range(5, 12, 4) == (2, 4)  # ceil(5*4/12)=2, ceil(12*4/12)=4
    assert map_depth(9, 4) == 3  # floor(9*4/12 + 0.5)
    assert map_range(1, 12, 24) == (2, 24)
    assert coupled_image_block(12, 24, 12) == 24 and coupled_image_block(1, 24, 12) == 2


# ------------------------------------------------------------------ schedule
def test_schedule_warmup_then_cosine():
    cfg = MethodConfig(lr=0.002, warmup_epochs=1, warmup_lr=1e-5, epochs=10)
    total, warmup = plan_steps(cfg, steps_per_epoch=5)
    assert (total, warmup) == (50, 5)
    assert lr_factor(cfg, 0, total, warmup) * cfg.lr == pytest.approx(1e-5)
    assert lr_factor(cfg, 5, total, warmup) == pytest.approx(1.0)
    assert lr_factor(cfg, 49, total, warmup) < 0.01
    exp = MethodConfig(schedule="exponential", final_lr_ratio=1e-3, iterations=100)
    assert lr_factor(exp, 100, 100, 0) == pytest.approx(1e-3)



def test_fit_reports_every_step_to_on_step(tmp_path, folder_dataset):
    import torch

    from peftbench.runner import build_method
    from peftbench.trainer import fit

    env = DataEnv(data_root=folder_dataset, split_dir=tmp_path / "splits", progress=False)
    spec = RunSpec(method="coop", dataset="imagefolder", backbone=TINY, pretrained=None, shots=4,
                   method_overrides=(("epochs", 2), ("batch_size", 4)))
    run = resolve(spec, torch.device("cpu"))
    data = run.task.build(run.dataset, spec.shots, spec.seed, run.backbone, env)
    model = build_method(run, data.classnames, data.template)
    seen = []

    def on_step(step, loss):
        assert model.training  # called inside the loop, before the next batch
        seen.append((step, loss))

    stats = fit(model, run.task, data, run.method_config, env, spec.seed, progress=False, on_step=on_step)
    assert [s for s, _ in seen] == list(range(1, stats.steps + 1)) and stats.steps == 2 * 4
    assert seen[-1][1] == stats.final_loss


# ------------------------------------------------------------------ runner
def test_config_hash_depends_on_resolved_spec_only(folder_dataset):
    import torch

    base = RunSpec(method="zeroshot", dataset="imagefolder", backbone=TINY, pretrained=None, shots=2)
    h = resolve(base, torch.device("cpu")).config_hash
    assert h == resolve(RunSpec(**{**base.__dict__}), torch.device("cpu")).config_hash
    assert h != resolve(RunSpec(**{**base.__dict__, "seed": 2}), torch.device("cpu")).config_hash
    # Overriding a field with its default value resolves to the same cell.
    same = RunSpec(**{**base.__dict__, "method_overrides": (("epochs", 0),)})
    assert resolve(same, torch.device("cpu")).config_hash == h


def test_same_spec_twice_gives_identical_metrics(tmp_path, folder_dataset):
    from test_store import Probe  # a one-parameter trainable method

    from peftbench.registry import register_method

    register_method("_probe_det")(Probe)
    Probe.poison = False
    Probe.after_fit_calls = 0
    try:
        env = DataEnv(data_root=folder_dataset, split_dir=tmp_path / "splits")
        spec = RunSpec(
            method="_probe_det",
            dataset="imagefolder",
            backbone=TINY,
            pretrained=None,
            shots=4,
            method_overrides=(("epochs", 3), ("batch_size", 4), ("lr", 0.5)),
        )
        a = execute(spec, ResultStore(tmp_path / "a"), env, progress=False).record
        b = execute(spec, ResultStore(tmp_path / "b"), env, progress=False).record
        assert a["status"] == b["status"] == "ok"
        assert a["metrics"] == b["metrics"] and a["train"]["final_loss"] == b["train"]["final_loss"]
        assert a["train"]["steps"] == 3 * 4  # 16 images / batch 4 = 4 steps per epoch
        assert Probe.after_fit_calls == 2  # once per run, after training
    finally:
        METHODS.pop("_probe_det")
