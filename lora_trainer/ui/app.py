"""The standalone app (``python -m lora_trainer ui``) on 127.0.0.1: the Train LoRA tab for diffusers models, and a
second mode, chosen by "Task", for a language model's LoRA (``ui.llm_panel``). The WebUI's tab stays image-only."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the Task choice → config model.task_type
TASKS = {"Image LoRA (text-to-image)": "text-to-image", "Language model LoRA (text-generation)": "text-generation"}
CSS_FILE, JS_FILE = ROOT / "style.css", ROOT / "javascript" / "lora_trainer.js"


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def build_app(host=None):
    import gradio as gr

    from lora_trainer.ui import compat
    from lora_trainer.ui.llm_panel import create_llm_panel
    from lora_trainer.ui.standalone_host import DiffusersHost
    from lora_trainer.ui.tab import create_tab

    host = host or DiffusersHost()
    with gr.Blocks(title="LoRA Trainer", analytics_enabled=False,
                   **compat.page_assets(gr.Blocks.__init__, _read(CSS_FILE), _read(JS_FILE))) as app:
        gr.Markdown("## Train LoRA")
        task = gr.Radio(label="Task", choices=list(TASKS), value=next(iter(TASKS)), elem_id="lora_trainer_task")
        with gr.Column(visible=True, elem_id="lora_trainer_image_mode") as image_mode:
            create_tab(host)  # a Blocks made inside another one renders in place
        with gr.Column(visible=False, elem_id="lora_trainer_llm_mode") as llm_mode:
            create_llm_panel(host)
        task.change(task_visibility, inputs=[task], outputs=[image_mode, llm_mode])
    return compat.queue(app)


def task_visibility(task: str) -> tuple:
    """The image mode and the language-model mode: the one the Task choice names shown, the other hidden."""
    import gradio as gr

    llm = TASKS.get(task) == "text-generation"
    return gr.update(visible=not llm), gr.update(visible=llm)


def launch(host: str = "127.0.0.1", port: int = 7870, lora_dir: str = "output/Lora", base_model: str = "tiny-demo",
           open_browser: bool = False) -> None:
    from lora_trainer.ui import compat
    from lora_trainer.ui.standalone_host import DiffusersHost

    app = build_app(DiffusersHost(lora_dir=lora_dir, base_model=base_model))
    app.launch(server_name=host, server_port=port, inbrowser=open_browser, share=False,
               **compat.page_assets(app.launch, _read(CSS_FILE), _read(JS_FILE)))
