"""A toy model, data set and collate function for end-to-end training tests of the engine plugins.

Batches look like XTuner's: ``{'data': {'inputs', 'attention_mask', 'targets'}, 'data_samples': None}``,
so ``ThroughputHook`` counts tokens from the attention mask.
"""

import torch
import torch.nn as nn
from mmengine.model import BaseModel
from torch.utils.data import Dataset

IN_DIM = 8
SEQ_LEN = 6


class ToyRegressionDataset(Dataset):
    """A fixed random regression problem: padded sequences of vectors -> one target each.

    The same ``seed`` always gives the same samples; targets come from a fixed random linear map of the
    masked mean of each sequence, so a small model can fit them.
    """

    def __init__(self, num_samples: int = 8, in_dim: int = IN_DIM, seq_len: int = SEQ_LEN, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(num_samples, seq_len, in_dim, generator=g)
        lengths = torch.randint(2, seq_len + 1, (num_samples,), generator=g)
        self.attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        self.inputs = self.inputs * self.attention_mask[..., None]  # zero padding
        w = torch.randn(in_dim, generator=g)
        pooled = self.inputs.sum(1) / self.attention_mask.sum(1, keepdim=True)
        self.targets = pooled @ w + 0.5

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, idx):
        return dict(inputs=self.inputs[idx], attention_mask=self.attention_mask[idx],
                    targets=self.targets[idx])


def toy_collate_fn(instances):
    """Stack samples into ``{'data': {...}, 'data_samples': None}``."""
    data = {key: torch.stack([inst[key] for inst in instances]) for key in instances[0]}
    return {'data': data, 'data_samples': None}


class ToyRegressionModel(BaseModel):
    """Two Linear layers over a masked mean; ``forward(data, data_samples=None, mode='loss')``.

    Args:
        crash_at_iter (int): when > 0, raise ``RuntimeError`` in the ``crash_at_iter``-th training forward
            (1-based), to test that a crashed run is detected.
    """

    def __init__(self, in_dim: int = IN_DIM, hidden: int = 16, crash_at_iter: int = 0, init_seed: int = 0):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.head = nn.Linear(hidden, 1)
        g = torch.Generator().manual_seed(init_seed)  # same start on every rank and in every process
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.crash_at_iter = crash_at_iter
        self._train_forwards = 0

    def forward(self, data, data_samples=None, mode='loss'):
        mask = data['attention_mask'].to(self.proj.weight.dtype)
        hidden = torch.relu(self.proj(data['inputs']))
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        pred = self.head(pooled).squeeze(-1)
        if mode == 'loss':
            if self.training:
                self._train_forwards += 1
                if self.crash_at_iter and self._train_forwards == self.crash_at_iter:
                    raise RuntimeError(f'ToyRegressionModel: deliberate crash at iteration {self.crash_at_iter}')
            target = data['targets'].to(pred.dtype)
            return dict(loss=torch.mean((pred - target) ** 2))
        if mode == 'predict':
            return pred
        return pred
