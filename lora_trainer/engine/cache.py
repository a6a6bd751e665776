"""Latents and text embeddings computed once before training, so steps do no VAE or text-encoder work.

Each image is encoded once (and once mirrored when random_flip is on). The VAE gives a posterior (mean
and std); the cached latent is one sample of it times the latent scaling factor, as kohya's cache_latents
and the diffusers examples do, drawn with a generator seeded by the run's seed and the image's key, so
the sample does not depend on the order of the images or on where the posterior came from. With
``store`` (cache_latents_to_disk) the posteriors are also kept on disk, one safetensors file per image
and flip, keyed by the image's content, the resolution, its JPEG decode scale and the VAE encoder's
weights: another run on the same images loads them and encodes only what is new. Captions are encoded
once each, one at a time, when the text encoder is frozen. Everything is kept on the CPU and moved per batch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_trainer.data.images import file_digest, prefetch
from lora_trainer.errors import DatasetError
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.utils.fsio import atomic_write
from lora_trainer.utils.text import name_list

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # bump when image loading, cropping or the stored tensors change (2: aspect-ratio buckets)


def encoder_fingerprint(vae: torch.nn.Module) -> str:
    """A digest of the weights that turn pixels into latents (the VAE's encoder and quant_conv), and their dtype.

    A VAE whose decoder alone was fine-tuned (sd-vae-ft-mse) encodes exactly as the original, and
    shares its cache entries.
    """
    params = [(n, p) for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    digest = hashlib.sha256()
    for name, p in params or list(vae.named_parameters()):
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def latent_key(digest: str, resolution: int, flipped: bool, encoder: str, decode_scale: int = 1,
               fit=None) -> str:
    """The cache key of one image (by its file's sha256) at one resolution, mirrored or not, for one VAE,
    decoded fully (``decode_scale`` 1) or at 1/2, 1/4, 1/8 of its size (fast_jpeg_decode), in its aspect-ratio
    bucket (``fit``, data.buckets.Fit: the bucket and the size it is resized to; None: the centre square)."""
    text = f"{CACHE_FORMAT}|{digest}|{resolution}|{int(flipped)}|{encoder}"
    text += f"|jpeg-1/{decode_scale}" if decode_scale > 1 else ""  # (a full decode keeps its old key)
    if fit is not None:
        text += "|bucket-{}x{}|resized-{}x{}".format(*fit.bucket, *fit.resized)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


class LatentStore:
    """VAE posteriors on disk: ``<folder>/<key>.safetensors`` with ``mean`` and ``std`` (fp32, before the
    model's latent scaling factor, so a VAE config with another factor reads them right)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.writable = True

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            mean, std = tensors["mean"], tensors["std"]
            if mean.ndim != 3 or mean.shape != std.shape:
                raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} are not one C×H×W latent")
            if not _finite(mean, std):
                raise ValueError("it holds non-finite values")
            return mean, std
        except (SafetensorError, OSError, KeyError, ValueError) as e:  # a cut-off write, a disk error
            log.warning("latent cache: %s is unreadable (%s); encoding that image again", path.name, e)
            return None

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Write one entry; if the disk refuses (full, read-only), warn once and train on without the store."""
        if not self.writable:
            return
        tensors = {"mean": mean.float().contiguous(), "std": std.float().contiguous()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path(key), lambda tmp: save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT}))
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            self.writable = False
            log.warning("latent cache: cannot write to %s (%s); training goes on with the latents in memory only",
                        self.folder, e)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _names(paths) -> str:
    return name_list(Path(p).name for p in paths)


def _check_latents(bad: list[Path], vae: torch.nn.Module) -> None:
    if not bad:
        return
    dtype = next(vae.parameters()).dtype
    cause = ("the VAE runs in fp16 and overflowed: run it in fp32 (in the WebUI: start it with --no-half-vae)"
             if dtype == torch.float16 else "check these images; if every image fails, the VAE's weights are damaged")
    raise DatasetError(f"the VAE gave non-finite latents for {len(bad)} image(s): {_names(bad)}; {cause}")


def _encode_captions(backend, captions: list[str], samples, weighted: bool, progress: bool) -> dict[str, Conditioning]:
    """Each caption on its own (its conditioning does not depend on which captions share a batch); a non-finite
    one stops the run here, before step 1, naming the caption, its images and the cause where it can be told."""
    from tqdm.auto import tqdm

    embeddings, bad = {}, []
    for caption in tqdm(captions, desc="caching captions", unit="caption", disable=not progress or len(captions) < 8):
        cond = backend.encode_prompts([caption], weighted=weighted).rows()[0]
        embeddings[caption] = cond
        if cond.bad_rows():
            bad.append(caption)
    if bad:
        caption = bad[0]
        images = [s.path for s in samples if s.caption == caption]
        raise DatasetError(f"the text conditioning of {len(bad)} caption(s) is not finite, e.g. {caption!r} "
                           f"(of {_names(images)}): {backend.explain_nonfinite_text(caption)}")
    return embeddings


def _sample(mean: torch.Tensor, std: torch.Tensor, seed: int, key: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()[:15], 16))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


class EncodedCache:
    def __init__(self, latents: list[torch.Tensor], flipped: list[torch.Tensor] | None,
                 texts: dict[str, Conditioning] | None):
        self._latents, self._flipped, self._texts = latents, flipped, texts

    @property
    def has_text(self) -> bool:
        return self._texts is not None

    @classmethod
    @torch.no_grad()
    def build(cls, backend, dataset, seed: int, flips: bool, texts: bool, progress: bool = True,
              digests: list[str] | None = None, store: LatentStore | None = None,
              weighted: bool = False, group=None) -> EncodedCache:
        """Encode ``dataset`` (an ImageDataset); ``digests``: each image file's sha256 where already known;
        ``weighted``: captions in the WebUI's emphasis syntax (data.weighted_captions). Non-finite latents or
        caption conditioning raise a DatasetError that names the images or the caption. ``group``: the processes of
        a multi-process run (engine.distributed): the images that any of them lacks are encoded once, each process
        taking every N-th, and shared; rank 0 alone writes them to ``store``."""
        from tqdm.auto import tqdm

        digests = [d or file_digest(s.path) for d, s in zip(digests or [None] * len(dataset), dataset.samples)]
        encoder = encoder_fingerprint(backend.image_encoder())
        variants = (False, True) if flips else (False,)
        scales = [dataset.decode_scale(i) for i in range(len(dataset))]
        fits = dataset.fits if dataset.buckets is not None else [None] * len(dataset)
        keys = [{f: latent_key(dig, dataset.resolution, f, encoder, s, fit) for f in variants}
                for dig, s, fit in zip(digests, scales, fits)]
        posteriors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if store is not None:
            for k in {k for per_image in keys for k in per_image.values()}:
                found = store.load(k)
                if found is not None:
                    posteriors[k] = found
        todo = [i for i, per_image in enumerate(keys) if any(k not in posteriors for k in per_image.values())]
        mine, writes = todo, store is not None
        if group is not None:  # (the processes' disk caches may differ: another node's, say)
            todo = sorted(set().union(*group.gather(todo, "listing the images to encode")))
            mine, writes = todo[group.rank::group.world_size], writes and group.main
        # one image per VAE call: a posterior then does not depend on which images shared its batch, so an
        # entry loaded from disk equals the one a fresh encode would give, whatever the batch size
        decoded = prefetch(dataset.__getitem__, mine)  # the next images decode while the VAE works
        bad: list[Path] = []
        encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, item in tqdm(zip(mine, decoded), total=len(mine), desc="caching latents", unit="image",
                            disable=not progress):
            pixels = item["pixel_values"][None].to(backend.device)
            for f in variants:
                mean, std = (t[0].float().cpu() for t in backend.encode_image_dist(pixels.flip(-1) if f else pixels))
                if not _finite(mean, std):
                    bad.append(dataset.samples[i].path)
                    break
                encoded[keys[i][f]] = (mean, std)
                if writes:  # (at once: a run stopped while caching keeps what was encoded)
                    store.save(keys[i][f], mean, std)
        if group is not None:
            shared = group.gather((encoded, [str(p) for p in bad]), "sharing the encoded latents")
            if writes:
                for k, (mean, std) in ((k, v) for r, (part, _) in enumerate(shared) if r != group.rank
                                       for k, v in part.items()):
                    store.save(k, mean, std)
            encoded = {k: v for part, _ in shared for k, v in part.items()}
            bad = [Path(p) for _, paths in shared for p in paths]
        posteriors.update(encoded)
        _check_latents(bad, backend.image_encoder())
        scale, dtype = backend.latent_scale, backend.weight_dtype
        # one tensor per image: images of different buckets have latents of different sizes
        latents = {f: [(_sample(*posteriors[k[f]], seed, k[f]) * scale).to(dtype) for k in keys] for f in variants}
        embeddings = {}
        if texts:
            embeddings = _encode_captions(backend, sorted({s.caption for s in dataset.samples}), dataset.samples,
                                          weighted, progress)
        loaded = len(dataset) - len(todo)
        log.info("cached the latents of %d images%s%s%s", len(dataset), " (and mirrored)" if flips else "",
                 f" and {len(embeddings)} caption embeddings" if texts else "",
                 f"; {loaded} loaded from {store.folder}, {len(todo)} encoded" if store is not None else "")
        return cls(latents[False], latents.get(True), embeddings if texts else None)

    def latents(self, indices: torch.Tensor, flip: torch.Tensor | None, device) -> torch.Tensor:
        """The latents of images ``indices`` (one bucket), mirrored where ``flip``, stacked on ``device``."""
        flips = [False] * len(indices) if flip is None else flip.cpu().tolist()
        rows = [(self._flipped if f else self._latents)[i] for i, f in zip(indices.tolist(), flips)]
        return torch.stack(rows).to(device)

    def text(self, captions: list[str], device) -> Conditioning:
        return Conditioning.cat([self._texts[c] for c in captions]).to(device)
