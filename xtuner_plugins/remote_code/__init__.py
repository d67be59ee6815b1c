"""The Python files shipped inside a converted folder (``tools/convert_to_official.py``).

``AutoModel.from_pretrained(folder, trust_remote_code=True)`` imports them from the folder, so they
depend on torch and transformers only, never on this package. They keep the class names, config fields,
weight keys and methods of OpenGVLab's InternVL remote code (``InternVLChatConfig``, ``InternVisionConfig``,
``InternVLChatModel`` with ``chat`` / ``batch_chat`` / ``generate``, ``InternVisionModel``,
``get_conv_template``), so tools written for official checkpoints work on ours. They are written for this
project, not copied.
"""

import os

FILES = ('configuration_intern_vit.py', 'configuration_internvl_chat.py', 'modeling_intern_vit.py',
         'modeling_internvl_chat.py', 'conversation.py')
FOLDER = os.path.dirname(os.path.abspath(__file__))

# ``--format remote`` (any encoder / projector): the files above (its model reuses InternVLChatModel's chat),
# these two, and the package's own projector module (it imports only torch), shipped as ``projector.py``.
VLM_FILES = FILES + ('configuration_vlm_chat.py', 'modeling_vlm_chat.py')
PROJECTOR_FILE = os.path.join(os.path.dirname(FOLDER), 'models', 'projector.py')

# ``config.json``'s ``auto_map`` of each kind of folder: the classes above that transformers imports
INTERN_VIT_AUTO_MAP = {  # an InternViT folder (OpenGVLab's layout)
    'AutoConfig': 'configuration_intern_vit.InternVisionConfig',
    'AutoModel': 'modeling_intern_vit.InternVisionModel',
}
INTERNVL_CHAT_AUTO_MAP = {  # --format official
    'AutoConfig': 'configuration_internvl_chat.InternVLChatConfig',
    'AutoModel': 'modeling_internvl_chat.InternVLChatModel',
    'AutoModelForCausalLM': 'modeling_internvl_chat.InternVLChatModel',
}
VLM_CHAT_AUTO_MAP = {  # --format remote
    'AutoConfig': 'configuration_vlm_chat.VLMChatConfig',
    'AutoModel': 'modeling_vlm_chat.VLMChatModel',
    'AutoModelForCausalLM': 'modeling_vlm_chat.VLMChatModel',
}
