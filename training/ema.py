"""An exponential moving average (EMA) of a model's weights and BatchNorm statistics, updated with
one foreach call per tensor group and no host-device synchronisation.

torch.optim.swa_utils.AveragedModel keeps its step count on the CPU and copies it to the device
at every update; from pageable memory that copy waits for the GPU, so the CPU could never run
ahead of it (and the bias-corrected average went through a Python loop over the tensors). The
step count here is a plain int. The arithmetic is AveragedModel's, op for op, so the averages are
the same bits (tests/training/test_fast_loop.py)."""
import copy

import torch


class WeightAverage:
    """`module` is the average: a copy of `model` that `update(model)` moves towards it.

    Plain, the average starts as the random initial weights and keeps a decay^t share of them;
    bias-corrected, each step's weight is (1 - decay) / (1 - decay^t), so the average is a true mean
    of the steps seen until ~1/(1 - decay) steps, then a plain EMA. Without the correction a slow
    starter (SVHN: hundreds of steps at chance) is validated as chance for epochs, and the lr
    schedule and early stopping react to that.
    """

    def __init__(self, model: torch.nn.Module, decay: float, bias_correction: bool):
        self.module = copy.deepcopy(model)
        self.decay, self.bias_correction = decay, bias_correction
        self.updates = 0

    @staticmethod
    def tensors(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(floating-point, other) parameters and buffers, in AveragedModel's order."""
        state = [t.detach() for t in (*model.parameters(), *model.buffers())]
        return [t for t in state if t.is_floating_point()], [t for t in state if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        (floats, others), (current_floats, current_others) = self.tensors(self.module), self.tensors(model)
        if self.updates == 0:
            torch._foreach_copy_(floats + others, current_floats + current_others)
        elif self.bias_correction:
            # AveragedModel computed this weight as a float32 tensor: the same here, to the bit.
            n = torch.tensor(self.updates)
            weight = ((1 - self.decay) / (1 - self.decay ** (n + 1))).item()
            step = torch._foreach_sub(current_floats, floats)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(floats, step)
            # Integer buffers (BatchNorm's batch count) were moved by the weight cast to an integer:
            # 0 once a step has been seen, so they keep their first value.
        else:
            torch._foreach_lerp_(floats, current_floats, 1 - self.decay)
            for averaged, current in zip(others, current_others):
                averaged.copy_(averaged * self.decay + current * (1 - self.decay))
        self.updates += 1
