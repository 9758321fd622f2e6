"""GPU checks (run on a CUDA machine: pytest -m gpu). Skipped elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import write_config
from mpc_lm import report
from mpc_lm.launch import launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("security, extra", [(None, ()), ({"provider": "tfp", "insecure_development_mode": True}, ()),
                                             (None, ({"name": "cloud", "role": "compute"},))],
                         ids=["ttp", "tfp", "ttp-3-parties"])
def test_all_parties_on_one_gpu_match_plaintext(tmp_path, tiny_models, security, extra):
    """Every party on cuda:0; with three computing parties the truncations are CrypTen's, whose wraps the
    dealer draws on the request's device (mpc_lm.dealer.Dealer.wraps)."""
    cfg = write_config(tmp_path, tiny_models["bert"], security=security, extra_parties=extra)
    data = yaml.safe_load(cfg.read_text())
    for party in data["parties"]:
        party["device"] = "cuda:0"
    cfg.write_text(yaml.safe_dump(data))
    summary = report.build(launch(cfg), check=True)
    fid = summary["fidelity"]["hospital"]
    print(fid)
    assert fid["max_abs_logit_error"] < 0.05 and fid["top1_agreement"] == 1.0


def _one_process_world():
    from mpc_lm._compat import import_crypten

    crypten = import_crypten()
    if not crypten.is_initialized():
        crypten.init()
    return crypten


@pytest.mark.parametrize("name", ["matmul", "matmul_wide", "square", "ge", "gelu", "inv_sqrt", "reciprocal",
                                  "softmax", "layer_norm_stock", "onehot_embed"])
def test_secure_op_on_cuda_matches_cpu(name):
    """The same secure operation in a one-process world on CPU and on CUDA: same plaintext."""
    from mpc_lm import approx
    from mpc_lm.reveal import open_to

    crypten = _one_process_world()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 64, generator=g) * 3
    w = torch.randn(64, 96, generator=g) * 0.2
    wide = torch.randn(300, 40, generator=g) * 0.2
    table = torch.randn(50, 8, generator=g)
    ops = {
        "matmul": lambda a: a.matmul(crypten.cryptensor(w.to(a.device))),
        "matmul_wide": lambda a: a[..., :1].expand(4, 16, 300).matmul(crypten.cryptensor(wide.to(a.device))),
        "square": lambda a: a.square(),
        "ge": lambda a: a.ge(0.5),
        "gelu": approx.gelu,
        "inv_sqrt": lambda a: approx.inv_sqrt(a.square() + 0.01, -12, 14, 3),
        "reciprocal": lambda a: approx.reciprocal(a.square() + 1, -1, 9, 4),
        "softmax": lambda a: approx.masked_softmax(a, a[..., :1, :] * 0 + 1, 8, 4),
        "layer_norm_stock": lambda a: (a.square().mean(-1, keepdim=True) + 1e-5).inv_sqrt(),
        "onehot_embed": lambda a: crypten.cryptensor(
            torch.nn.functional.one_hot(torch.arange(16, device=a.device) % 7, 50).long(), precision=0
        ).matmul(crypten.cryptensor(table.to(a.device))),
    }
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        a = crypten.cryptensor(x.to(device), device=device)
        out[device] = open_to(ops[name](a)).cpu()
    err = (out["cuda"] - out["cpu"]).abs().max().item()
    print(f"{name}: max |cuda - cpu| = {err:.3g}")
    assert err < 1e-3


@pytest.mark.gpu
def test_training_step_on_one_gpu_matches_autograd(tmp_path):
    """tests/test_train_step.py's small training step with every party on the GPU."""
    from mpc_lm import bench_train

    out = tmp_path / "step.json"
    assert bench_train.main(["--batch", "2", "--seq", "16", "--hidden", "64", "--heads", "4", "--intermediate",
                             "128", "--steps", "2", "--device", "cuda", "--port", "29688", "--timeout", "300",
                             "--json", str(out)]) == 0
    fid = json.loads(out.read_text())["fidelity"]
    assert fid["worst_max_rel_error"] < 0.01 and fid["worst_cosine"] > 0.9999, fid


def test_gpu_openings_travel_over_the_exchange_socket():
    """Openings of CUDA tensors over the parties' own socket (through host memory, any size) and over gloo's
    all-reduce: the same sums and XORs, the results on the GPU, the same counted traffic."""
    from test_transport import _run, check_openings

    results = {mode: _run(mode, device="cuda:0") for mode in ("socket", "allreduce")}
    check_openings(results, device="cuda:0")
    assert results["socket"][0]["traffic"] == results["allreduce"][0]["traffic"]
    # CrypTen's own shares (CUDALongTensor: its openings and Beaver products) over the socket too, returned wrapped
    wrapped = {"socket": _run("socket", device="cuda:0", wrapped=True)}
    check_openings(wrapped, device="cuda:0")
    assert wrapped["socket"][0]["small"]["types"] == ["CUDALongTensor"]


def test_ring_products_of_plain_gpu_tensors_equal_the_cpu_ring():
    """ring.matmul on plain int64 CUDA tensors (the offline phase's products with the weights, the dealer's
    masked products): torch has no int64 product on CUDA; the result equals the CPU's modulo 2^64."""
    from mpc_lm import ring

    from crypten.cuda import CUDALongTensor

    g = torch.Generator().manual_seed(5)
    for sa, sb in (((7, 300), (300, 9)), ((2, 5, 64), (64, 33)), ((1, 768), (768, 40)),
                   ((2, 3, 16, 8), (2, 3, 8, 16)), ((3, 5000), (5000, 7)), ((48,), (48, 5))):
        a = torch.randint(-(2**63), 2**63 - 1, sa, generator=g)
        b = torch.randint(-(2**63), 2**63 - 1, sb, generator=g)
        want = torch.matmul(a, b)
        got = ring.matmul(a.cuda(), b.cuda())
        assert type(got) is torch.Tensor and got.is_cuda
        assert torch.equal(got.cpu(), want)
        assert torch.equal(ring.matmul(a.cuda(), b.t().contiguous().t().cuda()).cpu(), want)  # by-column layout
        # CrypTen's shares (CUDALongTensor), as its Beaver products pass them once ring.install ran
        wrapped = ring.matmul(CUDALongTensor(a.cuda()), CUDALongTensor(b.cuda()))
        assert isinstance(wrapped, CUDALongTensor) and torch.equal(wrapped.tensor().cpu(), want)
        assert torch.equal(ring.matmul(CUDALongTensor(a.cuda()), b.cuda()).tensor().cpu(), want)


def test_gpu_ring_products_use_a_fraction_of_crypten_memory():
    """ring.matmul keeps 3 float64 copies of each operand where CrypTen's CUDALongTensor keeps 16: a GPT-2
    LM head's product (1 x 768 @ 768 x 50,257) at well under half of CrypTen's peak."""
    from crypten.cuda import CUDALongTensor

    from mpc_lm import ring

    a = torch.randint(-(2**63), 2**63 - 1, (1, 768), device="cuda")
    b = torch.randint(-(2**63), 2**63 - 1, (768, 50257), device="cuda")
    peaks = {}
    for name, product in (("ring", lambda: ring.matmul(a, b)),
                          ("crypten", lambda: torch.matmul(CUDALongTensor(a), CUDALongTensor(b)).tensor())):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        peaks[name] = (product(), torch.cuda.max_memory_allocated() - base)
    print({k: f"{v[1] / 2**20:.0f} MiB" for k, v in peaks.items()})
    assert torch.equal(peaks["ring"][0], peaks["crypten"][0])
    assert peaks["ring"][1] < 0.5 * peaks["crypten"][1]


def test_public_integer_factor_broadcasts_on_gpu_shares():
    """approx.mul_public_int growing the shape (a causal mask (B, 1, 1, T) times (t, T)): CrypTen's
    CUDALongTensor multiplies in place, so the product is made on the plain ring tensor."""
    from mpc_lm import approx
    from mpc_lm.reveal import open_to

    crypten = _one_process_world()
    x = torch.randn(2, 1, 1, 5)
    causal = (torch.arange(5)[None, :] <= torch.arange(2, 5)[:, None]).long()
    enc = crypten.cryptensor(x.cuda())
    got = open_to(approx.mul_public_int(enc, causal), dst=0)
    assert got.shape == (2, 1, 3, 5)
    assert torch.allclose(got.cpu(), x * causal, atol=1e-4)


def test_dealer_stream_draws_come_as_crypten_types_on_gpu():
    """prg.install: CrypTen's TTP code gets CUDALongTensor draws on the GPU (it multiplies them with torch's
    functions, which have no int64 product on CUDA), the same values as on the CPU."""
    from crypten.cuda import CUDALongTensor
    from crypten.mpc.provider import ttp_provider

    from mpc_lm import prg

    prg.install()
    key = bytes(range(16))
    got = ttp_provider.generate_random_ring_element((3, 4), generator=prg.AesStream(key, "cuda"), device="cuda")
    assert isinstance(got, CUDALongTensor)
    assert torch.equal(got.tensor().cpu(), prg.AesStream(key, "cpu").ring((3, 4)))
    bits = ttp_provider.generate_kbit_random_tensor((5,), bitlength=1, generator=prg.AesStream(key, "cuda"),
                                                    device="cuda")
    assert isinstance(bits, CUDALongTensor)
