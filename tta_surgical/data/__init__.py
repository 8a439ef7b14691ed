"""Readers for the official dataset layouts (CIFAR-10 python batches, CIFAR-10-C .npy, ImageNet-C folders)."""
