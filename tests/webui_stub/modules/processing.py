"""modules/processing.py (v1.10.1): StableDiffusionProcessingTxt2Img(**fields), process_images(p) -> Processed."""
from PIL import Image

calls = []


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=50, width=512, height=512,
                 cfg_scale=7.0, batch_size=1, n_iter=1, do_not_save_samples=False, do_not_save_grid=False, **kwargs):
        self.sd_model, self.prompt, self.negative_prompt, self.seed = sd_model, prompt, negative_prompt, seed
        self.steps, self.width, self.height = steps, width, height
        self.closed = False

    def close(self):
        self.closed = True


class Processed:
    def __init__(self, images):
        self.images = images


def process_images(p):
    calls.append(p)
    return Processed([Image.new("RGB", (8, 8), (len(calls) * 20 % 255, 0, 0))])
