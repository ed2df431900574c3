"""The compiled dequant-GEMM on a CUDA device (skipped without one): every autotune config compiles and runs,
and the modules' CUDA forward matches the reference in bf16 on realistic shapes."""
import pytest
import torch

from calm.nn import CodebookQuantLinear, UniformQuantLinear
from calm_kernels import packing, qgemm

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _oracle_and_torch(x, w, bias):
    wq = w.to(x.dtype)
    oracle = x.double() @ wq.double().T + (0 if bias is None else bias.to(x.dtype).double())
    return oracle, torch.nn.functional.linear(x, wq, None if bias is None else bias.to(x.dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 4, 16, 17, 300])
def test_uniform_module_on_cuda(bits, m):
    torch.manual_seed(bits + m)
    lin = torch.nn.Linear(1024, 768, bias=True)
    layer = UniformQuantLinear.from_float(lin, bits, 128).cuda()
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    oracle, ref = _oracle_and_torch(x, layer.dequantized_weight(), layer.bias)
    assert _rel(y, oracle) <= 2 * _rel(ref, oracle) + 1e-3


@pytest.mark.parametrize("m", [1, 8, 200])
def test_codebook_module_on_cuda(m):
    g = torch.Generator().manual_seed(m)
    n, k = 640, 1152
    column_bits = torch.where(torch.rand(k, generator=g) < 0.12, 4, 3)
    centroids = torch.randn(k, 16, generator=g) * 0.02
    codes = (torch.randint(0, 16, (n, k), generator=g) % (1 << column_bits)).to(torch.uint8)
    flat = torch.randperm(n * k, generator=g)[: n * k // 100]
    outliers = (flat // k, flat % k, torch.randn(flat.numel(), generator=g))
    bias = torch.randn(n, generator=g)
    layer = CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers, bias).cuda()
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    oracle, ref = _oracle_and_torch(x, layer.dequantized_weight(), layer.bias)
    assert _rel(layer(x), oracle) <= 2 * _rel(ref, oracle) + 1e-3


def test_every_autotune_config_compiles_and_agrees():
    from calm_kernels import _qgemm_triton as T

    torch.manual_seed(0)
    n, k = 300, 1024
    lin = torch.nn.Linear(k, n)
    layer = UniformQuantLinear.from_float(lin, 3, 64).cuda()
    w = layer.dequantized_weight()
    for m, path, configs in ((1, "gemv", T.gemv_configs()), (3, "gemv", T.gemv_configs()),
                             (9, "small", T.small_m_configs()), (100, "prefill", T.prefill_configs())):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        oracle, ref = _oracle_and_torch(x, w, layer.bias)
        for cfg in configs:
            for _ in range(2):  # split-K: the second launch needs the workspace the first one left clean
                out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                y = qgemm.uniform_matmul(x, layer.qweight, layer.scales, layer.zeros, 3, 64, k, layer.bias, out=out,
                                         config={**cfg.kwargs, "num_warps": cfg.num_warps,
                                                 "num_stages": cfg.num_stages}, path=path)
                assert _rel(y, oracle) <= 2 * _rel(ref, oracle) + 1e-3, (path, cfg)
    assert packing.packed_words(k, 3) == layer.qweight.shape[1]


@pytest.mark.parametrize("m", [1, 12, 64, 2048])
def test_module_forward_replays_in_a_cuda_graph(m):
    """After one eager call (autotuning, the kernel-ready copy, the split-K workspace), the forward captures
    into a CUDA graph and replays with new inputs."""
    torch.manual_seed(m)
    layer = UniformQuantLinear.from_float(torch.nn.Linear(2048, 1536), 4, 128).cuda()
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    layer(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    oracle, ref = _oracle_and_torch(x, layer.dequantized_weight(), layer.bias)
    assert _rel(y, oracle) <= 2 * _rel(ref, oracle) + 1e-3
