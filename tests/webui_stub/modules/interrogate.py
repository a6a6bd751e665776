"""modules/interrogate.py (v1.10.1): InterrogateModels.interrogate(pil_image) -> "caption, flavours"
("...<error>" on failure)."""


class InterrogateModels:
    def __init__(self):
        self.calls, self.fail = [], False

    def interrogate(self, pil_image):
        self.calls.append((pil_image.mode, pil_image.size))
        if self.fail:
            return "a red circle, flat colors<error>"
        return f"a red circle on a white background, {pil_image.mode}"
