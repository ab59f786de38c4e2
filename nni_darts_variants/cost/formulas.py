"""NNI shape-inference and FLOPs formulas for the operations of this package's spaces.

Importing this module registers them, so that NNI's ``FlopsProfiler`` / ``NumParamsProfiler``
(``nni.nas.profiler.pytorch.flops``) build on :class:`~search_spaces.DartsSpace`, :class:`~search_spaces.ProxylessSpace`
and NNI's hub ``NasBench201``. Without them NNI stops with "no shape inference formula is found for Zero()".

* ``Zero`` (DARTS ``none``), ``ZeroOp`` (ProxylessNAS ``zero``) and the hub NAS-Bench-201 ``Zero``: the output shape,
  strided where the op is; no FLOPs, no parameters.
* ``FactorizedReduce``: a profiler leaf (NNI's tracer loses the shape of ``x[:, :, 1:, 1:]``); its FLOPs are those of
  its ReLU, two 1x1 stride-2 convolutions and batch norm, each counted by NNI's own formula.
* ``aten.add.Tensor`` with a Python number (a frozen DARTS node sums its inputs with ``sum()``);
* ``aten.stack`` and ``aten.sum.dim_IntList`` (the hub NAS-Bench-201 cell sums its edges with them).
* ``nn.ConstantPad2d`` / ``nn.ZeroPad2d`` (NNI's hub DARTS ``FactorizedReduce`` pads): the padded shape, no FLOPs.
* NNI's hub DARTS ``CellPostprocessor`` (it hands ``[previous cell, this cell]`` to the next cell): the shapes of
  those two tensors; no FLOPs, no parameters.
* ``InputChoice`` with ``n_chosen > 1`` and ``reduction='sum'`` (a DARTS node): the shape of its inputs. NNI's
  formula handles ``n_chosen == 1`` only and still does. The inputs do not enter NNI's FLOPs expression: it counts
  every candidate edge of a cell (see :mod:`nni_darts_variants.cost.tables` for the per-edge share).
"""
from __future__ import annotations

import logging
from typing import Any

import nni.nas.nn.pytorch as nas_nn
from nni.nas.profiler.pytorch.flops import FlopsResult, count_flops_params, register_flops_formula
from nni.nas.profiler.pytorch.utils import profiler_leaf_module
from nni.nas.profiler.pytorch.utils.shape import MutableShape, extract_shape_info
import torch
import torch.nn as nn
from nni.nas.profiler.pytorch.utils.shape import ShapeTensor
from nni.nas.profiler.pytorch.utils.shape_formula import (aten_mean_dim, aten_shape_broadcast, input_choice_formula,
                                                          register_shape_inference_formula)

from search_spaces.ops import FactorizedReduce, Zero
from search_spaces.proxylessnas import ZeroOp

__all__ = ['strided_shape', 'register_formulas']


def strided_shape(shape: MutableShape, stride: int, channels: int | None = None) -> MutableShape:
    """``(N, C, H, W)`` after a stride (``ceil(H / stride)``, as ``x[..., ::stride, ::stride]``), C optionally new."""
    batch, c, *spatial = tuple(shape)
    return MutableShape(batch, c if channels is None else channels, *[-(-d // stride) for d in spatial])


def _zero_shape(module: Any, x: Any) -> MutableShape:
    shape = x.real_shape
    stride = getattr(module, 'stride', 1)
    channels = getattr(module, 'C_out', None)  # the hub NAS-Bench-201 Zero may change the width
    return strided_shape(shape, stride, channels) if stride != 1 or channels is not None else MutableShape(*shape)


def _no_cost(module: Any, input: Any, output: Any) -> FlopsResult:
    return FlopsResult(0., 0.)


def _factorized_reduce_shape(module: FactorizedReduce, x: Any) -> MutableShape:
    return strided_shape(x.real_shape, 2, module.bn.num_features)


def _factorized_reduce_flops(module: FactorizedReduce, input: tuple, output: MutableShape, config: Any) -> FlopsResult:
    shape_in = input[0]
    half = strided_shape(shape_in, 2, module.conv_1.out_channels)
    shapes = {'relu': ((shape_in,), shape_in), 'conv_1': ((shape_in,), half), 'conv_2': ((shape_in,), half),
              'bn': ((output,), output)}
    return sum((count_flops_params(name, getattr(module, name), shapes, config) for name in shapes),
               FlopsResult(0., 0.))


def _pad2d_shape(module: nn.ConstantPad2d, x: Any) -> MutableShape:
    left, right, top, bottom = module.padding
    *rest, height, width = tuple(x.real_shape)
    return MutableShape(*rest, height + top + bottom, width + left + right)


def _cell_postprocessor_shape(module: Any, this_cell: Any, previous_cells: list) -> list[MutableShape]:
    return [extract_shape_info(previous_cells[-1]), extract_shape_info(this_cell)]


def _input_choice_shape(module: nas_nn.InputChoice, inputs: list) -> MutableShape:
    if module.n_chosen == 1 or module.reduction != 'sum':
        return input_choice_formula(module, inputs)  # NNI's own (checked with NNI 3.0)
    shapes = [tuple(t.real_shape) for t in inputs]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f'{module.label}: a summed input choice needs inputs of one shape, got {shapes}')
    return extract_shape_info(inputs[0])


def _aten_stack_shape(fn: Any, tensors: list, dim: int = 0, **kwargs: Any) -> MutableShape:
    shape = list(tensors[0].real_shape)
    shape.insert(dim if dim >= 0 else len(shape) + 1 + dim, len(tensors))
    return MutableShape(*shape)


def _aten_add_shape(fn: Any, x: Any, y: Any, **kwargs: Any) -> MutableShape:
    """NNI's broadcast formula, plus a Python number on one side (``sum(tensors)`` starts from ``0``)."""
    if not isinstance(x, ShapeTensor):
        return extract_shape_info(y)
    if not isinstance(y, ShapeTensor):
        return extract_shape_info(x)
    return aten_shape_broadcast(fn, x, y, **kwargs)


def _zero_classes() -> list[type]:
    classes: list[type] = [Zero, ZeroOp]
    try:
        from nni.nas.hub.pytorch.nasbench201 import Zero as HubZero
        classes.append(HubZero)
    except ImportError:  # pragma: no cover - the hub is part of NNI 3.0
        pass
    return classes


_registered = False


def register_formulas() -> None:
    """Register the formulas (once; importing :mod:`nni_darts_variants.cost` does it)."""
    global _registered
    if _registered:
        return
    for cls in _zero_classes():
        register_shape_inference_formula(cls, _zero_shape)
        register_flops_formula(cls, _no_cost)
    from nni.nas.hub.pytorch.nasnet import CellPostprocessor
    register_shape_inference_formula(CellPostprocessor, _cell_postprocessor_shape)
    register_flops_formula(CellPostprocessor, _no_cost)
    for pad in (nn.ConstantPad2d, nn.ZeroPad2d):
        register_shape_inference_formula(pad, _pad2d_shape)
        register_flops_formula(pad, _no_cost)
    profiler_leaf_module(FactorizedReduce)
    register_shape_inference_formula(FactorizedReduce, _factorized_reduce_shape)
    register_flops_formula(FactorizedReduce, _factorized_reduce_flops)
    # Two of NNI's formulas are extended (they still serve their own cases); NNI warns when one is replaced.
    nni_logger = logging.getLogger('nni.nas.profiler.pytorch.utils.shape_formula')
    level = nni_logger.level
    nni_logger.setLevel(logging.ERROR)
    try:
        _register_extensions()
    finally:
        nni_logger.setLevel(level)
    _registered = True


def _register_extensions() -> None:
    register_shape_inference_formula(nas_nn.InputChoice, _input_choice_shape)
    # The hub NAS-Bench-201 cell sums its edges with torch.sum(torch.stack(...), 0).
    register_shape_inference_formula(torch.ops.aten.stack.default, _aten_stack_shape)
    register_shape_inference_formula(torch.ops.aten.sum.dim_IntList, aten_mean_dim)
    # A frozen DARTS node sums its chosen inputs with sum(), i.e. 0 + tensor.
    register_shape_inference_formula(torch.ops.aten.add.Tensor, _aten_add_shape)


register_formulas()
