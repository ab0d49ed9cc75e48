"""The model: the hierarchical VAE (vae: DVP-VAE, Ladder VAE, VampPrior) and its parts, pseudo_input (the DCT
pseudo-input u), blocks, unet and diffusion (the diffusion prior p(u)), likelihoods, precision (autocast), and
objectives (the ELBO terms, the importance-sampled NLL, active units), and checks (the models model.name may
name, the latent groups' resolutions, and the config's checks that need them and the image shape).

Imports: dvp.core (the noise of every draw, the config's errors). Never data, processes, the engines or the loop.
"""
