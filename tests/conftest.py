"""Suite-wide settings."""

import torch

# The suite's models are tiny: one thread is faster than two fighting over 2 cores,
# and timings vary far less when the machine is shared.
torch.set_num_threads(1)
