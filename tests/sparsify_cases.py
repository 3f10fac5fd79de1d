"""Shared pieces of the `sparsify` tests on Linen models of their own (gated MLPs,
t5x-style dense classes): random pretrained params, and the one jitted run that
compares a sparsified model with its original."""
import functools

import jax
import numpy as np
from flax import traverse_util

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def flat(tree):
  return traverse_util.flatten_dict(dict(tree))


def random_pretrained(model, tokens):
  """Random pretrained params (biases too, so a wrong bias would show; norm scales
  near 1)."""
  rng = np.random.default_rng(1)
  shapes = flat(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
  return traverse_util.unflatten_dict({
      p: (rng.normal(0, 0.5, s.shape) + (p[-1] == "scale")).astype(np.float32)
      for p, s in shapes.items()})


def outputs_against_the_original(model, pretrained, tokens, relu, jsrelu, params,
                                 **others):
  """One jitted pass: the original model on `pretrained`, and the sparsified `relu`,
  `jsrelu` (and each of `others`) on `params`, in eval mode and, for the original and
  `relu`, in training mode with the same dropout key; plus what `relu` sows."""
  rng = {"dropout": jax.random.key(3, impl="rbg")}

  @_jit
  def run(params, pretrained):
    v = {"params": params}
    _, state = relu.apply(v, tokens, mutable=["intermediates"])
    return {"original": model.apply({"params": pretrained}, tokens),
            "relu": relu.apply(v, tokens), "jsrelu": jsrelu.apply(v, tokens),
            **{name: other.apply(v, tokens) for name, other in others.items()},
            "original_train": model.apply({"params": pretrained}, tokens, True, rngs=rng),
            "relu_train": relu.apply(v, tokens, True, rngs=rng),
            "intermediates": state["intermediates"]}

  return run(params, pretrained)
