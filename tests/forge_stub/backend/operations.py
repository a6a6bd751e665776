"""backend/operations.py (Forge dfdcbab6): ForgeOperations.Linear, an nn.Module (not nn.Linear) with in_features,
out_features, weight, bias; its forward applies online LoRA patches (``forge_online_loras``), here as a weight delta."""
import torch


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def forward(self, x):
            weight, bias = self.weight, self.bias
            patches = getattr(self, "forge_online_loras", None)
            if patches is not None and "weight" in patches:
                weight = weight + patches["weight"]
            return torch.nn.functional.linear(x, weight, bias)
