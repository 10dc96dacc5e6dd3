"""Export a compiled lrcc graph to an ONNX model that onnxruntime runs, with every compressed site
kept in its compressed form.

How: the graph is lowered to torch as usual (lower_to_torch), but each site module is swapped for a
call to the placeholder op ``lrcc::onnx_site``; ``torch.onnx.export(dynamo=True)`` translates
everything else (attention, norms, activations) and emits one ``lrcc.Site`` node per site, which
holds no weights, so no exporter pass can fold a site back into a dense matrix. The placeholders are
then replaced, in place, by the ONNX nodes below, whose initializers are built from the site's
stored tensors. Symbolic dims of the graph's inputs (B, L) stay named dynamic dims in the model.

Op mapping (x is the site input; weights are stored transposed, n x m, so that no Transpose runs):

    site form                    ONNX nodes
    linear                       MatMul(x, W^T) [+ Add b]
    low-rank (v, u)              MatMul(MatMul(x, V^T), U^T) [+ Add b]; fp16 factors stay fp16
                                 initializers behind a Cast (onnxruntime folds it at load)
    quantised (codes, scale,     com.microsoft.MatMulNBits(x, B, scales, zero_points), bits 2/4/8
      zero [, in_scale])         as stored, 3-bit codes in 4-bit blocks; block_size = the group size
                                 (16..256), per-channel scales repeated per block; AWQ in_scale as
                                 Div(x, s) before it. quant_op="dequantize": DequantizeLinear
                                 (opset 21, uint8 or uint4 codes, block-wise along the input dim)
                                 -> MatMul, standard ops only
    quantised + low-rank         the quantised product + the low-rank pair, Add
    sparse + low-rank            MatMul(x, Cast(Constant(sparse_value=S^T))) + the low-rank pair

Choices, measured with onnxruntime 1.32 (CPU):
- MatMulNBits runs bits 2, 4 and 8 only ("additional bits support is planned"); 3-bit codes go in
  its 4-bit container (4/3 of lrcc's bytes for the codes, same kernel). Scales are fp32 (the op
  wants A's type) and zero points are packed like the codes. accuracy_level=1 (fp32 compute):
  outputs agree with the torch model to fp32 rounding.
- DequantizeLinear -> MatMul is fused by onnxruntime's optimizer into MatMulNBits with
  accuracy_level 4 (int8 activations: ~1e-3 relative error on the toy models) unless the session
  sets "session.qdq_matmulnbits_accuracy_level" to "0" (fp32 compute); with that entry the outputs
  are exact. Runtimes other than onnxruntime run the standard ops as written. The default
  (MatMulNBits written explicitly with accuracy_level=1) needs no session option.
- Sparse S: ONNX has no sparse matmul that runs from a stored weight. com.microsoft's
  SparseToDenseMatMul needs a sparse_tensor fed as a graph input, and onnxruntime turns sparse
  initializers (and Constant(sparse_value)) into dense tensors when it loads the model. So the file
  holds S^T sparsely (Constant with a COO sparse_value: fp16 values and int64 linear indices, 10
  bytes per non-zero, the format ONNX requires) and onnxruntime computes with a dense S in memory.
  A Constant is used rather than a graph sparse_initializer because ONNX shape inference (and
  so check_model(full_check=True)) mistypes consumers of sparse initializers.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import sympy
import torch
from torch import nn

from ..errors import LrccError
from ..ir.graph import Graph, Node

OPSET = 21
MS_DOMAIN = "com.microsoft"
SITE_DOMAIN = "lrcc"
NBITS_BLOCKS = (16, 32, 64, 128, 256)  # block sizes MatMulNBits runs on CPU
QUANT_OPS = ("matmulnbits", "dequantize")


# --- torch side: a weightless placeholder per site ------------------------------------------
@torch.library.custom_op("lrcc::onnx_site", mutates_args=())
def _onnx_site(x: torch.Tensor, site: str, m: int) -> torch.Tensor:
    """Stands for site `site` (m output features) while the rest of the graph is exported."""
    return x.new_zeros(*x.shape[:-1], m)


@_onnx_site.register_fake
def _onnx_site_fake(x: torch.Tensor, site: str, m: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], m)


class _SitePlaceholder(nn.Module):
    def __init__(self, site: str, m: int) -> None:
        super().__init__()
        self.site, self.m = site, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lrcc.onnx_site(x, self.site, self.m)


def _site_translation():
    """The onnxscript function that turns lrcc::onnx_site into an lrcc.Site node."""
    import onnxscript
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    schema = OpSchema("Site", SITE_DOMAIN, 1, inputs=[param("x", "T")], outputs=[param("y", "T")],
                      type_constraints=[("T", ["tensor(float)"], "site activations")],
                      attributes=[OpSchema.Attribute("site", OpSchema.AttrType.STRING, "site name"),
                                  OpSchema.Attribute("m", OpSchema.AttrType.INT, "output features")])
    site_op = onnxscript.values.Op(onnxscript.values.Opset(SITE_DOMAIN, 1), "Site", schema)

    def onnx_site(x, site: str, m: int):
        return site_op(x, site=site, m=m)
    return onnx_site


def _out_features(g: Graph, n: Node) -> int:
    if n.op == "linear":
        return int(g.tensor(n.inputs[1]).shape[0])
    if n.op == "lowrank_linear":
        return int(g.tensor(n.inputs[2]).shape[0])
    return int(n.attrs["m"])


def _placeholder_module(g: Graph) -> torch.fx.GraphModule:
    """The lowered graph with every site module replaced by a weightless placeholder."""
    from .torch_module import lower_to_torch
    from ..targets.cost import APPROXIMATE_ATTENTION
    for n in g.nodes:
        if n.op == "aten" and n.attrs.get("target") == APPROXIMATE_ATTENTION:
            raise LrccError(f"ONNX export: attention site {n.attrs['attention'].get('site', n.name)!r} was rewritten to "
                            f"{n.attrs['attention'].get('approximation', 'an approximate form')}, which has no ONNX "
                            "operator; compile without a latency budget (or with "
                            "options={'rules': [...]} leaving out the attention rules) to export ONNX")
    low = lower_to_torch(g)
    by_site = {n.attrs["site"]: n for n in g.sites()}
    for site, path in low.site_names.items():
        if site not in by_site:  # an exact attention site: exported as the operator it is
            continue
        n = by_site[site]
        if n.dtype not in (None, torch.float32):
            raise LrccError(f"ONNX export: site {site!r} (node {n.name!r}) computes in {n.dtype}; the exporter "
                            "writes fp32 activations only; compile the model in float32")
        parent, _, attr = path.rpartition(".")
        setattr(low.gm.get_submodule(parent), attr, _SitePlaceholder(site, _out_features(g, n)))
    return low.gm.eval()


def _example_inputs(g: Graph) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, str] | None, ...]]:
    """Inputs to trace with (distinct small sizes for symbolic dims) and their named dynamic dims."""
    values: dict[str, int] = {}
    for i, name in enumerate(sorted(g.symbols)):
        lo, hi = g.symbols[name]
        values[name] = max(min(2 + i, hi), lo)
    env = {sympy.Symbol(k, integer=True, positive=True): v for k, v in values.items()}
    env.update({sympy.Symbol(k): v for k, v in values.items()})
    examples, dynamic = [], []
    for node in g.inputs():
        if node.shape is None:
            raise LrccError(f"ONNX export: input {node.name!r} is not a tensor")
        shape = [int(sympy.sympify(d).subs(env)) for d in node.shape]
        dims = {i: str(d) for i, d in enumerate(node.shape) if getattr(d, "is_Symbol", False)}
        dtype = node.dtype or torch.float32
        examples.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
        dynamic.append(dims or None)
    return tuple(examples), tuple(dynamic)


def _export_rest(g: Graph):
    """torch.onnx.export of the graph with placeholder sites; returns the ModelProto."""
    gm = _placeholder_module(g)
    examples, dynamic = _example_inputs(g)
    n_out = len(g.nodes[-1].inputs)
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    import logging
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                gm, examples, dynamo=True, optimize=True, opset_version=OPSET, output_names=names,
                dynamic_shapes=dynamic if any(d is not None for d in dynamic) else None,
                custom_translation_table={torch.ops.lrcc.onnx_site.default: _site_translation()}, verbose=False)
    except Exception as e:  # torch.onnx raises many kinds; we name the IR node where we can
        raise _export_error(g, e) from e
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    return prog.model_proto


def _export_error(g: Graph, e: Exception) -> LrccError:
    """An LrccError naming the IR node whose operator torch.onnx could not translate."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    aten = [n for n in g.nodes if n.op == "aten"]
    wanted = [f"{a}.{b}" for a, b in re.findall(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)", text)]
    wanted += [f"{a}.{b}" for a, b in re.findall(r"target=torch\.ops\.([\w.]+)\.(\w+)\]", text)]
    for target in wanted:
        for n in aten:
            if n.attrs["target"] == target:
                return LrccError(f"ONNX export: node {n.name!r} ({target}) has no ONNX translation in torch.onnx; "
                                 "rewrite that part of the model with operators ONNX has, or save with format=None")
    summary = [ln.strip() for ln in text.splitlines() if ln.startswith("<class")]
    why = summary[0] if summary else next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return LrccError(f"ONNX export: torch.onnx could not export the graph: {why[:400]}")


# --- ONNX side: the nodes that replace each placeholder ----------------------------------------
class _Emitter:
    """Collects the nodes and initializers that replace one site's placeholder."""

    def __init__(self, prefix: str, taken: set[str]) -> None:
        self.prefix, self.taken = prefix, taken
        self.nodes: list = []
        self.inits: list = []
        self.uses_ms = False

    def name(self, what: str) -> str:
        base = f"{self.prefix}/{what}"
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def init(self, what: str, array: np.ndarray) -> str:
        from onnx import numpy_helper
        name = self.name(what)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_4bit(self, what: str, codes: np.ndarray) -> str:
        """A uint4 initializer (values < 16), two per byte, the first in the low nibble."""
        from onnx import TensorProto, helper
        flat = codes.astype(np.uint8).reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        name = self.name(what)
        self.inits.append(helper.make_tensor(name, TensorProto.UINT4, list(codes.shape), packed.tobytes(), raw=True))
        return name

    def node(self, op: str, inputs: list[str], what: str, domain: str = "", **attrs) -> str:
        from onnx import helper
        out = self.name(what)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{op}"), domain=domain, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms = True
        return out

    def floats(self, what: str, t: torch.Tensor) -> str:
        """A weight kept in its stored float dtype (fp16 stays fp16 behind a Cast to float)."""
        from onnx import TensorProto
        arr = t.detach().cpu()
        if arr.dtype == torch.bfloat16:
            arr = arr.float()
        name = self.init(what, arr.numpy())
        if arr.dtype == torch.float32:
            return name
        return self.node("Cast", [name], f"{what}_f32", to=TensorProto.FLOAT)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last dim, 8 // bits per byte, the first in the lowest bits."""
    if bits == 8:
        return q.astype(np.uint8)
    per = 8 // bits
    pad = (-q.shape[-1]) % per
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), q.dtype)], axis=-1)
    q = q.reshape(q.shape[:-1] + (q.shape[-1] // per, per)).astype(np.uint16)
    out = np.zeros(q.shape[:-1], np.uint16)
    for k in range(per):
        out |= q[..., k] << (bits * k)
    return out.astype(np.uint8)


def _quant_arrays(g: Graph, n: Node, parts: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Unpacked codes (m x n), fp32 scale and integer zero (m x groups), and the group size."""
    from ..rewrites.quantize import unpack
    bits, m, k = n.attrs.get("bits"), n.attrs["m"], n.attrs["n"]
    if bits not in (2, 3, 4, 8):
        raise LrccError(f"ONNX export: site {n.attrs['site']!r} (node {n.name!r}) is quantised to {bits} bits; "
                        "the exporter writes 2, 3, 4 and 8 bits")
    cols = n.attrs.get("cols") or k
    codes = unpack(parts["codes"], bits, cols)
    scale, zero = parts["scale"].float(), parts["zero"].float()
    groups = scale.shape[1]
    if cols % groups or codes.shape != (m, cols):
        raise LrccError(f"ONNX export: site {n.attrs['site']!r} (node {n.name!r}): codes {tuple(codes.shape)} do not "
                        f"split into {groups} groups")
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() >= (1 << bits):
        raise LrccError(f"ONNX export: site {n.attrs['site']!r} (node {n.name!r}): zero points are not integers in "
                        f"[0, {(1 << bits) - 1}]; ONNX quantised weights need integer zero points")
    return codes[:, :k].numpy(), scale.numpy(), zero.to(torch.uint8).numpy(), cols // groups


def _nbits_block(group: int, groups: int, k: int) -> int | None:
    if groups == 1:  # one scale per row, repeated per block: the block size that pads k least
        return min(NBITS_BLOCKS, key=lambda b: (math.ceil(k / b) * b, -b))
    fits = [b for b in NBITS_BLOCKS if group % b == 0]
    return max(fits) if fits else None


def _quant_term(em: _Emitter, g: Graph, n: Node, parts: dict[str, torch.Tensor], x: str, quant_op: str) -> str:
    """x M^T for the quantised main part M (AWQ: (x / s) M'^T)."""
    codes, scale, zero, group = _quant_arrays(g, n, parts)
    m, k, bits = n.attrs["m"], n.attrs["n"], n.attrs["bits"]
    groups = scale.shape[1]
    if "in_scale" in parts:
        x = em.node("Div", [x, em.init("in_scale", parts["in_scale"].float().numpy())], "x_awq")
    block = _nbits_block(group, groups, k)
    if quant_op == "matmulnbits" and block is not None:
        nbits = 4 if bits == 3 else bits
        nb = math.ceil(k / block)
        padded = np.zeros((m, nb * block), np.uint8)
        padded[:, :k] = codes
        of_block = np.minimum((np.arange(nb) * block) // group, groups - 1)
        b = em.init("qweight", _pack(padded, nbits).reshape(m, nb, block * nbits // 8))
        s = em.init("scales", scale[:, of_block].astype(np.float32).reshape(-1))
        z = em.init("zero_points", _pack(zero[:, of_block], nbits).reshape(-1))
        return em.node("MatMulNBits", [x, b, s, z], "y_quant", domain=MS_DOMAIN, K=k, N=m, bits=nbits,
                       block_size=block, accuracy_level=1)
    # standard ops: DequantizeLinear (W^T layout, blocks along the input dim) -> MatMul
    codes_t, zero_t = codes.T, (zero.T if groups > 1 else zero[:, 0])
    if bits == 8:
        q, zp = em.init("codes_t", codes_t), em.init("zero_t", zero_t)
    else:
        q, zp = em.init_4bit("codes_t", codes_t), em.init_4bit("zero_t", zero_t)
    if groups == 1:
        s = em.init("scale", scale[:, 0].astype(np.float32))
        wt = em.node("DequantizeLinear", [q, s, zp], "w_t", axis=1)
    else:
        s = em.init("scale_t", scale.T.astype(np.float32))
        wt = em.node("DequantizeLinear", [q, s, zp], "w_t", axis=0, block_size=group)
    return em.node("MatMul", [x, wt], "y_quant")


def _sparse_term(em: _Emitter, n: Node, parts: dict[str, torch.Tensor], x: str) -> str | None:
    """x S^T for the CSR part S, S^T held as a sparse Constant."""
    from onnx import TensorProto, helper, numpy_helper
    m, k = n.attrs["m"], n.attrs["n"]
    rowptr = parts["rowptr"].long()
    rows = torch.repeat_interleave(torch.arange(m), rowptr[1:] - rowptr[:-1])
    cols = parts["cols"].long()
    if cols.numel() == 0:
        return None
    linear = cols * m + rows  # index into S^T (k x m), row-major
    order = torch.argsort(linear)
    values = parts["values"][order].detach().cpu()
    values = values.numpy() if values.dtype in (torch.float16, torch.float32) else values.float().numpy()
    vname, iname = em.name("s_values"), em.name("s_indices")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(values, vname),
                                       numpy_helper.from_array(linear[order].numpy().astype(np.int64), iname), [k, m])
    st = em.node("Constant", [], "s_t", sparse_value=sparse)
    if values.dtype != np.float32:
        st = em.node("Cast", [st], "s_t_f32", to=TensorProto.FLOAT)
    return em.node("MatMul", [x, st], "y_sparse")


def _lower_site(em: _Emitter, g: Graph, n: Node, x: str, quant_op: str) -> tuple[list[str], str | None]:
    """The site's terms (values to add up) and its bias initializer, if any."""
    ts = [g.tensor(i) for i in n.inputs[1:]]
    if n.op == "linear":
        w = em.floats("weight_t", ts[0].float().t().contiguous())
        return [em.node("MatMul", [x, w], "y")], (em.init("bias", ts[1].float().numpy()) if len(ts) > 1 else None)
    if n.op == "lowrank_linear":
        parts = {"v": ts[0], "u": ts[1], **({"bias": ts[2]} if len(ts) > 2 else {})}
    elif n.op == "compressed_linear":
        parts = dict(zip(n.attrs["roles"], ts))
    else:
        raise LrccError(f"ONNX export: node {n.name!r} ({n.op}) is not a site the exporter knows")
    terms = []
    if "codes" in parts:
        terms.append(_quant_term(em, g, n, parts, x, quant_op))
    if "values" in parts:
        term = _sparse_term(em, n, parts, x)
        if term is not None:
            terms.append(term)
    if "v" in parts:
        vt = em.floats("v_t", parts["v"].t().contiguous())
        ut = em.floats("u_t", parts["u"].t().contiguous())
        terms.append(em.node("MatMul", [em.node("MatMul", [x, vt], "h"), ut], "y_lowrank"))
    if not terms:
        raise LrccError(f"ONNX export: site {n.attrs['site']!r} (node {n.name!r}) has no part the exporter can "
                        f"write (roles {n.attrs.get('roles')})")
    bias = em.init("bias", parts["bias"].float().numpy()) if "bias" in parts else None
    return terms, bias


def _splice(model, g: Graph, quant_op: str):
    """Replace every lrcc.Site node of the exported model by the nodes computing its site."""
    from onnx import helper
    by_site = {n.attrs["site"]: n for n in g.sites()}
    graph = model.graph
    taken = {i.name for i in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    taken |= {o for nd in graph.node for o in nd.output} | {nd.name for nd in graph.node}
    new_nodes, uses_ms, seen = [], False, set()
    for nd in graph.node:
        if nd.domain != SITE_DOMAIN:
            new_nodes.append(nd)
            continue
        site = next(a.s.decode() for a in nd.attribute if a.name == "site")
        if site not in by_site or site in seen:
            raise LrccError(f"ONNX export: the exported graph has an unexpected placeholder for site {site!r}")
        seen.add(site)
        n = by_site[site]
        em = _Emitter(site, taken)
        terms, bias = _lower_site(em, g, n, nd.input[0], quant_op)
        addends = terms + ([bias] if bias else [])
        total = addends[0]
        for a in addends[1:]:
            total = em.node("Add", [total, a], "y")
        em.nodes[-1].output[0] = nd.output[0]  # the last node writes the placeholder's output
        new_nodes.extend(em.nodes)
        graph.initializer.extend(em.inits)
        uses_ms |= em.uses_ms
    missing = set(by_site) - seen
    if missing:
        raise LrccError(f"ONNX export: sites {sorted(missing)} did not reach the exported graph")
    del graph.node[:]
    graph.node.extend(new_nodes)
    opsets = [o for o in model.opset_import if o.domain not in (SITE_DOMAIN, MS_DOMAIN)]
    if uses_ms:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model


def graph_to_onnx(g: Graph, quant_op: str = "matmulnbits"):
    """An onnx.ModelProto computing the graph, compressed sites in compressed form (see module doc)."""
    if quant_op not in QUANT_OPS:
        raise LrccError(f"ONNX export: quant_op={quant_op!r}; use one of {', '.join(QUANT_OPS)}")
    for n in g.nodes:
        if n.op not in ("input", "param", "aten", "output") and not n.is_site:
            raise LrccError(f"ONNX export: node {n.name!r} has kind {n.op!r}, which the exporter cannot express")
    return _splice(_export_rest(g), g, quant_op)


def export_onnx(g: Graph, path: str | os.PathLike, quant_op: str = "matmulnbits", check: bool = True) -> Path:
    """Write the graph (or a CompiledModel's graph) as an ONNX model to the file `path`.

    quant_op: "matmulnbits" (com.microsoft.MatMulNBits, onnxruntime's fast kernel) or "dequantize"
    (standard DequantizeLinear + MatMul only). check=True runs onnx's full checker on the result.
    """
    import onnx
    if not isinstance(g, Graph) and isinstance(getattr(g, "graph", None), Graph):
        g = g.graph
    model = graph_to_onnx(g, quant_op)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go beside the file
    if large:
        onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save_model(model, str(out))
    if check:
        try:
            onnx.checker.check_model(str(out) if large else model, full_check=True)
        except Exception as e:  # onnx raises ValidationError / InferenceError
            raise LrccError(f"ONNX export: the written model {out} fails onnx.checker: {str(e).strip()[:500]}") from e
    return out


__all__ = ["export_onnx", "graph_to_onnx", "QUANT_OPS", "OPSET"]
