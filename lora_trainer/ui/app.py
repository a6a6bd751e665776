"""The standalone app: the Train LoRA tab on 127.0.0.1, training diffusers models (``python -m lora_trainer ui``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSS_FILE, JS_FILE = ROOT / "style.css", ROOT / "javascript" / "lora_trainer.js"


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def build_app(host=None):
    import gradio as gr

    from lora_trainer.ui import compat
    from lora_trainer.ui.standalone_host import DiffusersHost
    from lora_trainer.ui.tab import create_tab

    host = host or DiffusersHost()
    with gr.Blocks(title="LoRA Trainer", analytics_enabled=False,
                   **compat.page_assets(gr.Blocks.__init__, _read(CSS_FILE), _read(JS_FILE))) as app:
        gr.Markdown("## Train LoRA")
        create_tab(host)  # a Blocks made inside another one renders in place
    return compat.queue(app)


def launch(host: str = "127.0.0.1", port: int = 7870, lora_dir: str = "output/Lora", base_model: str = "tiny-demo",
           open_browser: bool = False) -> None:
    from lora_trainer.ui import compat
    from lora_trainer.ui.standalone_host import DiffusersHost

    app = build_app(DiffusersHost(lora_dir=lora_dir, base_model=base_model))
    app.launch(server_name=host, server_port=port, inbrowser=open_browser, share=False,
               **compat.page_assets(app.launch, _read(CSS_FILE), _read(JS_FILE)))
