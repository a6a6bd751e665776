// lora-trainer: one global name only (the WebUI shares one JS namespace between extensions).
// Keys inside the Train LoRA tab:
//   Ctrl+Enter in the dataset folder or name field: Train (as Ctrl+Enter generates in txt2img);
//   in a caption of the grid: Ctrl+S saves the captions, Alt+PageDown / Alt+PageUp turn the page
//   (Tab and Shift+Tab move between captions, as in any form).
function loraTrainerOnKey(event) {
    const target = event.target;
    const root = target.closest && target.closest("#lora_trainer_root");
    if (!root) return;
    const click = (id) => {
        const button = root.querySelector("#" + id);
        if (button) { event.preventDefault(); button.click(); }
    };
    const inCaption = target.closest("[id^='lora_trainer_caption_']");
    if (inCaption) {
        if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
            target.dispatchEvent(new Event("change", {bubbles: true}));  // let gradio read the last keystrokes
            click("lora_trainer_save_captions");
        } else if (event.altKey && event.key === "PageDown") {
            click("lora_trainer_next_page");
        } else if (event.altKey && event.key === "PageUp") {
            click("lora_trainer_prev_page");
        }
        return;
    }
    if (event.ctrlKey && event.key === "Enter" && target.closest("#lora_trainer_data_dir, #lora_trainer_name")) {
        click("lora_trainer_train");
    }
}
document.addEventListener("keydown", loraTrainerOnKey);
