// lora-trainer: one global name only (the WebUI shares one JS namespace between extensions).
// Ctrl+Enter in the dataset folder or name field starts training, as Ctrl+Enter generates in txt2img.
function loraTrainerOnKey(event) {
    if (!(event.ctrlKey && event.key === "Enter")) return;
    const root = event.target.closest && event.target.closest("#lora_trainer_root");
    if (!root) return;
    const button = root.querySelector("#lora_trainer_train");
    if (button) { event.preventDefault(); button.click(); }
}
document.addEventListener("keydown", loraTrainerOnKey);
