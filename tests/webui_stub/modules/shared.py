"""modules/shared.py: sd_model, opts, cmd_opts, state (v1.10.1: shared.py, shared_state.py, options.py)."""
import types

from modules import interrogate, options, shared_state

sd_model = None
cmd_opts = types.SimpleNamespace(lora_dir="", lowvram=False, medvram=False)
opts = options.Options()
# the built-in options the extension reads (modules/shared_options.py defaults)
opts.data.update(emphasis="Original", use_old_emphasis_implementation=False, deepbooru_escape=True, upcast_attn=False)
state = shared_state.State()
loaded_hypernetworks = []  # modules/shared.py: the hypernetworks a prompt or the settings loaded
interrogator = interrogate.InterrogateModels()
OptionInfo = options.OptionInfo
