"""GAN losses of VQGAN tokenizer training (taming-transformers ``VQLPIPSWithDiscriminator``), as pure jnp functions.

Discriminator: ``hinge_d_loss`` or ``vanilla_d_loss`` on the logits of real images and of (stop-gradient)
reconstructions. Generator: ``generator_loss`` = -mean(D(x')) for both. The generator's GAN term is scaled by
``adopt_weight(disc_factor, step, disc_start)`` (0 before the discriminator starts) and by VQGAN's adaptive weight::

  d_weight = clip(||dL_nll/dW|| / (||dL_g/dW|| + 1e-4), 0, 1e4) * discriminator_weight      (stop-gradient)

where W is the decoder's last layer (our ``params['decoder']['conv_out']['kernel']``). How a trainer gets the two
norms: either with ``last_layer_grad_norm`` on closures of that kernel alone::

  def with_kernel(k):   # the generator params with another last-layer kernel
    dec = params['decoder']
    return {**params, 'decoder': {**dec, 'conv_out': {**dec['conv_out'], 'kernel': k}}}
  def nll_of(k):
    return nll(x, vae.apply({'params': with_kernel(k), **stats}, x)[0])
  def g_of(k):
    rec = vae.apply({'params': with_kernel(k), **stats}, x)[0]
    return generator_loss(disc.apply(d_vars, rec, True, mutable=['batch_stats'])[0])
  kernel = params['decoder']['conv_out']['kernel']
  w = adaptive_generator_weight(last_layer_grad_norm(nll_of, kernel), last_layer_grad_norm(g_of, kernel))

or, cheaper (no re-run of the encoder/decoder), from the gradients of each loss w.r.t. the reconstruction pulled
back through the last conv only: with ``h`` the input of ``conv_out`` (captured in the forward),
``_, vjp = jax.vjp(lambda k: conv_out(h, k), kernel)`` and ``norm(vjp(dL_nll/dx')[0])``,
``norm(vjp(dL_g/dx')[0])`` -- the same numbers, since dL/dW = (dx'/dW)^T dL/dx'. Either way the total generator
gradient is then dL_nll + d_weight * adopt_weight(...) * dL_g (the weight is a constant to the backward pass, as
taming's ``.detach()``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
  """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x')))) (taming ``hinge_d_loss``)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real))) + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def vanilla_d_loss(logits_real, logits_fake):
  """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x')))) (taming ``vanilla_d_loss``: the non-saturating BCE)."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real))) + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def generator_loss(logits_fake):
  """-mean(D(x')): taming's generator loss for both the hinge and the vanilla discriminator loss."""
  return -jnp.mean(_f32(logits_fake))


def adopt_weight(weight, step, threshold, value: float = 0.0):
  """``weight`` from step ``threshold`` on, ``value`` (0) before: taming's ``adopt_weight(weight, global_step,
  threshold=disc_start)``. Traceable (``step`` may be a traced int)."""
  return jnp.where(jnp.asarray(step) < threshold, jnp.float32(value), _f32(weight))


def adaptive_generator_weight(nll_grad_norm, g_grad_norm, max_weight: float = 1e4):
  """VQGAN's adaptive GAN weight ||dL_nll/dW|| / (||dL_g/dW|| + 1e-4), clipped to [0, max_weight], stop-gradient.

  Multiply by the config's ``discriminator_weight`` (taming does it after the clip) and by ``adopt_weight``.
  """
  w = _f32(nll_grad_norm) / (_f32(g_grad_norm) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def last_layer_grad_norm(loss_fn: Callable[[Any], jax.Array], last_layer_params) -> jax.Array:
  """||d loss_fn / d last_layer_params||_2 (Frobenius norm over every element, as ``torch.norm`` of taming's
  ``autograd.grad(loss, last_layer)``; a pytree of params gives the global norm). ``loss_fn`` maps the last
  layer's parameters (normally the decoder's ``conv_out`` kernel) to a scalar loss; see the module docstring."""
  grads = jax.grad(loss_fn)(last_layer_params)
  leaves = jax.tree.leaves(grads)
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
