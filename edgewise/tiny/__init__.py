"""Tiny training: compile a model into a training graph that fits a microcontroller's SRAM.

Ahead of time, separate from any runtime: `frontend` turns a PyTorch module into the IR (`ir`),
`autodiff` derives the backward graph from a table of gradient rules and prunes what the trained
parameters do not need, `executor` runs forward and backward graphs as the reference.
"""
