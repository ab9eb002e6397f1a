"""Shared checks of the model-family tests: a converted tiny transformers model must give transformers'
logits (float32, <= 1e-4) and greedy tokens, through from_hugging_face, convert + from_checkpoint, the
runtime (kiln.LLM) and tensor parallelism. test_family_parity.py runs them over every family's CASES table;
each test_<family>.py declares its table and tests only what is particular to the family."""

from __future__ import annotations

import torch

from conftest import greedy_tokens, hf_forward, make_tiny_hf
from kiln.checkpoint.convert import convert_checkpoint
from kiln.llmapi.llm import LLM
from kiln.llmapi.sampling_params import SamplingParams
from kiln.models import model_class
from kiln.models.base import PretrainedModel

ATOL = 1e-4
GEN_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=GEN_TOKENS, ignore_eos=True)
MAX_DIFFS: dict[str, float] = {}  # case -> the largest logit difference seen (reported by the tests' -s run)


class Family:
    """case name -> (transformers config class, model class, config kwargs); models made once per module."""

    def __init__(self, tmp_path_factory, cases: dict):
        self.tmp, self.cases, self.made, self.tokens = tmp_path_factory, cases, {}, {}

    def hf(self, case):
        if case not in self.made:
            config_cls, model_cls, kwargs = self.cases[case]
            hf_dir = self.tmp.mktemp(case) / "hf"
            self.made[case] = hf_dir, make_tiny_hf(hf_dir, config_cls, model_cls, **kwargs)
        return self.made[case]

    def hf_tokens(self, case) -> list[int]:
        """transformers' greedy continuation of PROMPT (no KV cache)."""
        if case not in self.tokens:
            _, hf = self.hf(case)
            self.tokens[case] = greedy_tokens(hf_forward(hf), prompt(hf), GEN_TOKENS)[0, PROMPT_LEN:].tolist()
        return self.tokens[case]


_FAMILIES: dict[int, Family] = {}  # id(CASES) -> its Family, one per session


def shared_family(tmp_path_factory, cases: dict) -> Family:
    """The session's one Family of a CASES table: the parity tests and the family's own tests share its models."""
    if id(cases) not in _FAMILIES:
        _FAMILIES[id(cases)] = Family(tmp_path_factory, cases)
    return _FAMILIES[id(cases)]


PROMPT_LEN = 8


def prompt(hf) -> torch.Tensor:
    return torch.randint(0, hf.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(2))


def max_logit_diff(model, hf) -> float:
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids, use_cache=False).logits
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours.float() - theirs.float()).abs().max().item()


def check_model(model, family: Family, case: str) -> None:
    _, hf = family.hf(case)
    diff = max_logit_diff(model, hf)
    MAX_DIFFS[case] = max(MAX_DIFFS.get(case, 0.0), diff)
    assert diff <= ATOL, f"{case}: max logit diff {diff}"
    ours = greedy_tokens(model, prompt(hf), GEN_TOKENS)[0, PROMPT_LEN:].tolist()
    assert ours == family.hf_tokens(case)


def check_from_hugging_face(family: Family, case: str, model_cls) -> None:
    hf_dir, hf = family.hf(case)
    architecture = hf.config.architectures[0]
    assert model_class(architecture) is model_cls
    model = model_cls.from_hugging_face(hf_dir, dtype="float32")
    assert model.config.architecture == architecture
    check_model(model, family, case)


def check_convert_checkpoint(family: Family, case: str, tmp_path, model_cls) -> None:
    hf_dir, _ = family.hf(case)
    ckpt = convert_checkpoint(hf_dir, tmp_path / "ckpt", dtype="float32")
    model = PretrainedModel.from_checkpoint(ckpt)
    assert isinstance(model, model_cls)
    check_model(model, family, case)


def check_runtime(family: Family, case: str) -> None:
    """kiln.LLM(hf_dir) (convert + build in-process, KV cache, scheduler) gives transformers' greedy tokens."""
    hf_dir, hf = family.hf(case)
    with LLM(hf_dir, dtype="float32") as llm:
        out = llm.generate([prompt(hf)[0].tolist()], GREEDY)
    assert out[0].outputs[0].token_ids == family.hf_tokens(case)


def check_tensor_parallel(family: Family, cases: list[str], tmp_path) -> None:
    """Each case converted with tp_size=2 and run by two worker processes gives the TP=1 (transformers) tokens."""
    for case in cases:
        hf_dir, hf = family.hf(case)
        ckpt = convert_checkpoint(hf_dir, tmp_path / f"ckpt-{case}", dtype="float32", tp_size=2)
        with LLM(ckpt, tensor_parallel_size=2, device="cpu") as llm:
            out = llm.generate([prompt(hf)[0].tolist()], GREEDY)
        assert out[0].outputs[0].token_ids == family.hf_tokens(case), case


def report_max_diffs():
    """Module-scoped autouse fixture body: print each case's largest logit difference (seen with -s)."""
    yield
    for case, diff in sorted(MAX_DIFFS.items()):
        print(f"\nmax |logit diff| {case}: {diff:.2e}")
