"""modules/deepbooru.py (v1.10.1): model = DeepDanbooru(); start(), tag_multi(pil_image, force_disable_ranks), stop().

tag_multi escapes ( ) \\ with a backslash when opts.deepbooru_escape is on (the WebUI's default)."""


class DeepDanbooru:
    def __init__(self):
        self.calls = []

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")

    def tag_multi(self, pil_image, force_disable_ranks=False):
        from modules import shared

        self.calls.append(("tag_multi", pil_image.size, force_disable_ranks))
        miku = r"hatsune miku \(vocaloid\)" if shared.opts.deepbooru_escape else "hatsune miku (vocaloid)"
        return f"1girl, {miku}, {pil_image.size[0]}px"


model = DeepDanbooru()
