"""PyTorch custom-op registrations with autograd, one module per kernel family."""
