r"""The released ELM/BiGR binary autoencoder (BAE) with K = 16 bits per latent cell, 256px, trained as the reference.

  python -m var_jax.train --config=configs/bae_k16.py --workdir=gs://bucket/bae_k16 \
      --config.data.path=/data/imagenet --config.loss.lpips_path=/ckpt/lpips_vgg.safetensors
Fine-tune a released file: --config.init_from=/ckpt/binaryae_ema.th (its ae.* tensors initialise the BAE, disc.*
the discriminator where shapes fit, and perceptual.* LPIPS when --config.loss.lpips_path is not given).
``configs/bae_k{20,24,32}.py`` differ only in K; 512px (BiGR d32-512): configs/bae_k32.py with
--config.data.image_size=512 --config.bae.resolution=512 (no per-level attention then, as the release).

Architecture (``release``): the reference's ``custom`` dataset defaults with ``--norm_first`` (nf 128, ch_mult
1,1,2,2,4 = 16x downsampling, 2 res blocks, attention at 16px, emb_dim 256), which reproduces the released
parameter counts (65,526,550 for K = 16; tests/interop/bae_layout_test.py). Recipe (Binary Latent Diffusion's
``train_ae_dist.py`` + ``BinaryGAN``, which ELM and BiGR adapt; ELM: 1M iterations at batch 256):
- loss: L1 + 1.0 LPIPS (the reference feeds LPIPS the [0, 1] images as they are) + d_weight * (-E[D(x')])
  + code_weight (0) * code_book_loss; d_weight = min(adaptive weight, disc_weight_max = 1), 0 before disc_start;
- discriminator: taming's PatchGAN (ndf 64, 3 layers, BatchNorm), hinge loss, from step 400001 (the BLD README's
  --disc_start_step; the hparams default is 30001);
- Adam (torch defaults: betas 0.9/0.999, no weight decay) for both, lr = base_lr 4.5e-6 x per-GPU batch: the
  per-GPU split of ELM's batch 256 is not published; 8 GPUs x 32 gives 1.44e-4 (the reference also drops the BAE
  lr 10x at step 1.5M, past this schedule);
- EMA 0.995 every 10 steps (--ema; the released files are the EMA); data: resize to 1.05x, random crop, flip.
The reference trains with fp16 autocast (--amp); set --config.dtype=bfloat16 for mixed precision.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def release(codebook_size: int, resolution: int = 256):
  """The BAE training config of the releases with K = ``codebook_size`` bits (``configs/bae_k*.py`` call this)."""
  import ml_collections
  from var_jax.models.bae import BAEConfig
  c = common.tokenizer_base()
  c.tokenizer = 'bae'        # task 'tokenizer'; this picks the generator
  for k in ('vae', 'codebook'):
    del c[k]
  fields = common._fields(BAEConfig, codebook_size=codebook_size, resolution=resolution)  # pylint: disable=W0212
  c.bae = ml_collections.ConfigDict(fields)
  c.data.update(image_size=resolution, mid_reso=1.05, hflip=True)
  c.global_batch_size = 256
  c.total_steps = 1_000_000
  del c.loss['vq']
  c.loss.update(l1=1.0, l2=0.0, lpips=1.0, gan=1.0, disc_start=400001, disc_loss='hinge', adaptive=True)
  c.loss.disc_weight_max = 1.0          # the reference's disc_weight_max: clip of the adaptive weight
  c.loss.code = 0.0                     # code_weight: the weight of the quantizer's code_book_loss
  c.loss.lpips_signed_input = False     # True: LPIPS gets 2x - 1 instead of the reference's [0, 1] images
  c.disc.update(ndf=64, n_layers=3, norm='batch')
  lr = 4.5e-6 * 32
  c.optim_g.update(lr=lr, b1=0.9, b2=0.999, warmup_steps=0)
  c.optim_d.update(lr=lr, b1=0.9, b2=0.999, warmup_steps=0)
  c.ema = ml_collections.ConfigDict(dict(decay=0.995, every=10, start=1))
  c.train_bits = 'bernoulli'            # 'threshold': the reference's --deterministic (ELM's bae_16_deter)
  c.log_every = 200
  c.ckpt_every = 10000
  c.sample_every = 5000
  return c


def get_config():
  return release(16)
