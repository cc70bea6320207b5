import pytest

from jaxlm.config import PRESETS, all_keys, load_config, to_yaml
from jaxlm.config_checks import check_vocab, resolve_mesh_shape
from jaxlm.errors import ConfigError

from conftest import tiny_config


def error(*overrides, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_width_not_divisible_by_heads():
    msg = error("model.d_model=100", "model.n_heads=3")
    assert "model.d_model=100 is not divisible by model.n_heads=3" in msg
    assert "[1, 2, 4, 5, 10, 20, 25, 50, 100]" in msg  # says what to pick


def test_kv_heads_must_divide_heads():
    msg = error("model.family=llama", "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=3")
    assert "model.n_kv_heads=3 does not divide model.n_heads=8" in msg


def test_mesh_product_must_equal_device_count():
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1")
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8 devices"):
        resolve_mesh_shape(cfg, 8)
    assert resolve_mesh_shape(tiny_config("mesh.data=-1", "mesh.tensor=2"), 8) == (4, 1, 2)


def test_batch_must_divide_data_parallel_size():
    cfg = tiny_config("train.batch_size=12", "mesh.data=8")
    with pytest.raises(ConfigError, match="12 is not divisible by the data-parallel size mesh.data\\*mesh.fsdp = 8"):
        resolve_mesh_shape(cfg, 8)


def test_unknown_key_in_override_suggests():
    msg = error("optim.lrr=3e-3")
    assert "unknown config key 'optim.lrr'" in msg and "did you mean 'optim.lr'?" in msg


def test_unknown_key_in_yaml_suggests(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  stpes: 10\n")
    msg = error(path=str(p))
    assert "unknown config key 'train.stpes'" in msg and str(p) in msg and "did you mean 'train.steps'?" in msg


def test_unknown_section_suggests():
    assert "did you mean 'optim.lr'" in error("optimizer.lr=1")


def test_wrong_type():
    msg = error("train.steps=lots")
    assert "wrong type for 'train.steps'" in msg and "'lots'" in msg and "int" in msg


@pytest.mark.parametrize("override,key", [
    ("train.steps=0", "train.steps"), ("train.batch_size=-4", "train.batch_size"),
    ("model.n_layers=0", "model.n_layers"), ("model.d_model=-64", "model.d_model"),
    ("train.seq_len=0", "train.seq_len"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("model.attention_block=-1", "model.attention_block"), ("train.loss_chunk=-5", "train.loss_chunk")])
def test_negative_or_zero_sizes(override, key):
    assert key in error(override)


def test_bad_choice_suggests():
    assert "did you mean 'cosine'" in error("optim.schedule=cosin")


def test_mesh_axis_sizes():
    assert "at most one of" in error("mesh.data=-1", "mesh.fsdp=-1")
    assert "mesh.tensor must be a positive size or -1" in error("mesh.tensor=0")


def test_tensor_must_divide_heads():
    cfg = tiny_config("model.n_heads=4", "mesh.data=1", "mesh.tensor=8")
    with pytest.raises(ConfigError, match="mesh.tensor=8 does not divide model.n_heads=4"):
        resolve_mesh_shape(cfg, 8)


def test_vocab_must_match_tokenizer():
    cfg = tiny_config("model.vocab_size=300")
    with pytest.raises(ConfigError, match="does not match the tokenizer's 256"):
        check_vocab(cfg, 256)
    assert check_vocab(tiny_config("model.vocab_size=384"), 300) == 384  # padded to a multiple of 128
    assert check_vocab(tiny_config(), 256) == 256


def test_yaml_deltas_then_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("optim:\n  lr: 0.01\ntrain:\n  steps: 7\n")
    cfg = load_config(str(p), ["optim.lr=3e-3"])
    assert cfg.optim.lr == 3e-3 and cfg.train.steps == 7 and cfg.train.batch_size == 32


def test_presets_and_explicit_keys_win():
    cfg = load_config(None, ["model.preset=gpt2-124m"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (768, 12, 12)
    cfg = load_config(None, ["model.preset=llama-tiny", "model.n_layers=3"])
    assert cfg.model.family == "llama" and cfg.model.n_layers == 3 and cfg.model.kv_heads == 2
    assert not cfg.model.tied and not cfg.model.use_bias
    assert "did you mean 'gpt2-124m'" in error("model.preset=gpt2-124")
    for name in PRESETS:
        load_config(None, [f"model.preset={name}"])  # every preset validates


def test_resolved_yaml_round_trips(tmp_path):
    cfg = tiny_config("mesh.fsdp=4", "run.name=x")
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(str(p)) == cfg


def test_stable_interface_keys_exist():
    keys = set(all_keys())
    stable = ["run.name", "run.dir", "train.steps", "train.seed", "train.batch_size", "train.seq_len",
              "eval.every", "checkpoint.every", "mesh.data", "mesh.fsdp", "mesh.tensor", "optim.lr",
              "model.preset", "data.source", "model.kernels", "model.parametrization"]
    assert set(stable) <= keys


def test_bad_override_syntax():
    assert "key=value" in error("optim.lr")


def test_eval_batch_must_divide_data_parallel_size():
    with pytest.raises(ConfigError, match="eval.batch_size=6 is not divisible"):
        resolve_mesh_shape(tiny_config("eval.batch_size=6"), 8)
