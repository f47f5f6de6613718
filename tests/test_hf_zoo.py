"""Hugging Face ``transformers`` models, as a new user brings them, held to the oracle.

Tiny configs (no weights downloaded) of the architectures people use: ViT, ConvNeXt,
ResNet (BatchNorm), Swin, BERT, GPT-2 (a sequence classifier, and the LM head with tied
embeddings), T5 (encoder-decoder) and Llama (RMSNorm). The kernel is of the logits, in
float64, in every output mode, against ``reference.py``'s jacrev oracle; the model is
left as it was. GPT-2's forward calls ``.item()`` (its padding check, where a pad token is set), which torch.func's
vmap cannot trace: "auto" takes the batch graph, "vmap" and the sketch raise a typed
error naming the methods that compute the kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import transformers  # a test dependency (requirements.txt): CI runs this module, no skip
from reference import TOL, reference_ntk, rel_err
from test_state_and_errors import assert_same, snapshot

import fastntk
from fastntk.errors import UntraceableError
from fastntk.rules import nodes

transformers.logging.set_verbosity_error()  # (tiny configs: special tokens outside vocab)

TOL64 = TOL[torch.float64]
V, T = 32, 3  # vocabulary and sequence length of the token models


class Logits(nn.Module):
    """The model's ``.logits`` (N, ...): the output fastntk takes the kernel of."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class Seq2Seq(Logits):
    """An encoder-decoder's logits, its decoder fed the first two tokens shifted right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dec = self.model._shift_right(x[:, :2])
        return self.model(input_ids=x, decoder_input_ids=dec).logits


class Summed(nn.Module):
    """Σ_k f_k (N, 1): the function whose kernel ``output="sum"`` is.

    Its oracle is held to ``output="sum"`` rather than the full kernel's sum: Llama's and
    T5's RMSNorm compute the variance in float32 (also in a float64 model), so the
    gradient of each logit is rounded to float32 on that path, and the sum of K rounded
    Jacobians differs from the Jacobian of the sum by 1.2e-8 relative (Llama, K = 96;
    T5: 9.6e-9); the Jacobian of the sum agrees to 3e-16."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y.reshape(y.shape[0], -1).sum(1, keepdim=True)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _with_eos(x: torch.Tensor) -> torch.Tensor:
    """Tokens 2.. (0: pad, 1: <eos>) ending with one <eos>."""
    x = x.clamp_min(2)
    x[:, -1] = 1
    return x


_GPT2 = dict(vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2)

# name -> (wrapper, transformers model class, its config class, the config, inputs)
MODELS = {
    "vit": (Logits, "ViTForImageClassification", "ViTConfig", dict(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3), _images),
    "convnext": (Logits, "ConvNextForImageClassification", "ConvNextConfig", dict(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), _images),
    "resnet": (Logits, "ResNetForImageClassification", "ResNetConfig", dict(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=3), _images),
    "swin": (Logits, "SwinForImageClassification", "SwinConfig", dict(
        image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
        window_size=4, num_labels=3), _images),
    "bert": (Logits, "BertForSequenceClassification", "BertConfig", dict(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8, num_labels=3), _tokens),
    "gpt2-classifier": (Logits, "GPT2ForSequenceClassification", "GPT2Config", dict(
        _GPT2, num_labels=3, pad_token_id=0), _tokens),
    "gpt2-lm": (Logits, "GPT2LMHeadModel", "GPT2Config", _GPT2, _tokens),  # tied embeddings
    # a pad token set (as users do for batches): the padding check calls .item()
    "gpt2-lm-padded": (Logits, "GPT2LMHeadModel", "GPT2Config", dict(
        _GPT2, pad_token_id=0), _tokens),
    "t5": (Seq2Seq, "T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0), _tokens),
    # two layers: the relative-position bias computed once, added in both (two exits of
    # its sample-free subgraph); the classifier reads each input's one <eos> token
    "t5-classifier": (Logits, "T5ForSequenceClassification", "T5Config", dict(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        num_labels=3), lambda n, seed: _with_eos(_tokens(n, seed))),
    "llama": (Logits, "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8), _tokens),
}  # fmt: skip
# GPT-2's forward checks for padding with .item() where the config has a pad token
UNTRACEABLE = ("gpt2-classifier", "gpt2-lm-padded")


def _model(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers' notes on tiny configs)
        wrapper, cls, config, kw, inputs = MODELS[name]
        model = wrapper(getattr(transformers, cls)(getattr(transformers, config)(**kw)))
    # float64; in training mode, as a new model is (fastntk runs its dropout in eval mode)
    return model.double().train(), inputs(3, 1), inputs(2, 2)


def _checked(model, *args, **kw) -> torch.Tensor:
    """fastntk.ntk(model, ...), the model unchanged by the call."""
    before = snapshot(model)
    theta = fastntk.ntk(model, *args, dtype=torch.float64, **kw)
    assert_same(before, snapshot(model))
    return theta


def _reference(model, x1, x2=None, output="sum", bn="eval") -> torch.Tensor:
    if output == "sum":
        return reference_ntk(Summed(model), x1, x2, output="sum", bn=bn)
    return reference_ntk(model, x1, x2, output=output, bn=bn)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_matches_the_oracle(name):
    """Every output mode and a cross-kernel, method="auto", bn="eval"."""
    model, x1, x2 = _model(name)
    if name.startswith("gpt2-lm"):  # the LM head's weight is the token embedding's
        assert model.model.lm_head.weight is model.model.transformer.wte.weight
    for output in ("sum", "trace", "mean", "full"):
        got = _checked(model, x1, output=output)
        assert rel_err(got, _reference(model, x1, output=output)) <= TOL64, output
    got = _checked(model, x1, x2, output="trace")
    assert rel_err(got, _reference(model, x1, x2, output="trace")) <= TOL64, "cross"


@pytest.mark.parametrize("bn", ["eval", "per_sample", "batch"])
def test_hf_resnet_batchnorm_modes(bn):
    model, x1, x2 = _model("resnet")
    for output in ("sum", "full"):
        got = _checked(model, x1, output=output, bn=bn)
        assert rel_err(got, _reference(model, x1, output=output, bn=bn)) <= TOL64, output
    got = _checked(model, x1, x2, output="trace", bn=bn)
    assert rel_err(got, _reference(model, x1, x2, output="trace", bn=bn)) <= TOL64, "cross"


@pytest.mark.parametrize("name", UNTRACEABLE)
def test_untraceable_forward_takes_the_batch_graph(name, monkeypatch):
    """torch.func's vmap cannot trace GPT-2's forward (``.item()``): "auto" crashed with
    torch's untyped RuntimeError. Node rules now serve every parameter of GPT-2 (``Conv1D``
    through ``addmm``, ``wpe`` through its sample-free lookup), so the layerwise methods and
    the sketch need no torch.func at all; without node rules the layerwise methods take
    the batch graph (exact), and the sketch and "vmap" raise UntraceableError naming the
    methods that can. The padded LM is the unpadded one with a pad token set: the same
    logits, so the same sketch."""
    model, x1, x2 = _model(name)
    for method in ("layerwise", "loop"):
        got = _checked(model, x1, x2, output="trace", method=method)
        assert rel_err(got, _reference(model, x1, x2, output="trace")) <= TOL64, method
    before = snapshot(model)
    with pytest.raises(UntraceableError, match=r"\.item\(\).*'auto' or 'loop'"):
        fastntk.ntk(model, x1, method="vmap", dtype=torch.float64)
    sketch = fastntk.ntk_sketch(model, x1, sketch_dim=8, dtype=torch.float64)
    if name == "gpt2-lm-padded":
        plain = _model("gpt2-lm")[0]
        assert (
            rel_err(sketch, fastntk.ntk_sketch(plain, x1, sketch_dim=8, dtype=torch.float64))
            <= TOL64
        )
    monkeypatch.setattr(nodes, "find", lambda use, n: None)  # no node rules
    for method in ("auto", "layerwise"):
        got = _checked(model, x1, x2, output="trace", method=method)
        assert rel_err(got, _reference(model, x1, x2, output="trace")) <= TOL64, method
    with pytest.raises(UntraceableError, match="'auto' or 'loop'"):
        fastntk.ntk_sketch(model, x1, sketch_dim=8, dtype=torch.float64)
    assert_same(before, snapshot(model))


# parameter tensors that neither a module rule nor a node rule serves (none since Swin's
# relative-position tables, added to rows that merge each sample's windows, take
# SampleFreeRule with merged rows)
FALLBACKS: dict[str, int] = {}


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_models_take_rules_and_node_rules(name):
    """``explain``: every parameter on a module rule or a node rule (rules.nodes), but
    the ones listed; no torch.func fallback, so the untraceable GPT-2s stay layerwise."""
    model, x1, _ = _model(name)
    ex = fastntk.explain(model, x1)
    fallbacks = [p.name for p in ex.params if not p.path.startswith("rule:")]
    assert len(fallbacks) == FALLBACKS.get(name, 0), fallbacks
    assert ex.strategy == "layerwise", ex.why
