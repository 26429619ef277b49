"""`make demo`: the whole pipeline on real photographs and images from four real generators, offline.

- `demo.data`: real photos that ship inside installed packages (Python and Debian), cut into crops;
  three upscalers run on downscaled crops of the same photos (Real-ESRGAN, the seen generator;
  waifu2x and SRMD, held out) and StyleGAN2 faces (the OpenVINO files of the `random-face` package),
  all as 64x64 PNG.
- `demo.ddpm`: a small pixel-space DDPM trained for a few CPU minutes on the training photos,
  because no pretrained diffusion weights can be downloaded here.
- `python -m demo`: data, model, shard, extract, train on one generator, eval on all of them.
"""
