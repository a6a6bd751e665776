"""modules/deepbooru.py (v1.10.1): model = DeepDanbooru(); start(), tag_multi(pil_image, force_disable_ranks), stop()."""


class DeepDanbooru:
    def __init__(self):
        self.calls = []

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")

    def tag_multi(self, pil_image, force_disable_ranks=False):
        self.calls.append(("tag_multi", pil_image.size, force_disable_ranks))
        return f"1girl, solo, {pil_image.size[0]}px"


model = DeepDanbooru()
