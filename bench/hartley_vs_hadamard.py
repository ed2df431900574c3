"""Per-token activation quantization error after an online rotation: the Hadamard of order 1536 (24 x 64)
against the Hartley x Hadamard factor calm uses where no Hadamard is built (here Hartley_3 x H_4 x H_128 of the
same order), on heavy-tailed rows (Student-t, 3 degrees of freedom; 8 channels scaled x30). CPU, seconds.

    python bench/hartley_vs_hadamard.py
"""
import math

import torch

from calm_kernels import rotated as R


def main() -> None:
    torch.manual_seed(0)
    n = 1536
    x = torch.distributions.StudentT(3.0).sample((512, n))
    x[:, torch.randperm(n)[:8]] *= 30
    hartley = R.KroneckerTransform((R.hartley_matrix(3).float(), R.hadamard_matrix(4).float(),
                                    R.hadamard_matrix(128).float()), 1 / math.sqrt(n), True)
    for bits in (4, 3):
        errors = {}
        for name, t in (("none", None), ("hadamard", R.hadamard_transform(n)), ("hartley", hartley)):
            z = x if t is None else t.apply(x)
            q = R.fake_quantize_activations(z, bits)
            errors[name] = float((q - z).norm() ** 2 / z.norm() ** 2)
        print(f"A{bits}: relative squared error " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
