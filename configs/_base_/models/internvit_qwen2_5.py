# InternViT-300M-448px-V2_5 + pixel-shuffle MLP projector + Qwen2.5-Instruct (InternVL 2.5's recipe).
#
# The model paths, for every InternViT stage config (configs/pretrain_mlp.py and the stages over it): local
# folders, so that nothing is downloaded at run time. Fetch them once:
#   huggingface-cli download OpenGVLab/InternViT-300M-448px-V2_5 --local-dir models/InternViT-300M-448px-V2_5
#   huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir models/Qwen2.5-1.5B-Instruct
# or point a run elsewhere: --cfg-options model.vision_encoder=DIR model.llm=DIR (the data set takes its tile size,
# tokens per tile and tokenizer from them; `llm_path=` itself changes nothing once read).
from xtuner_plugins.models import VisionLanguageModel

vision_encoder_path = 'models/InternViT-300M-448px-V2_5'
llm_path = 'models/Qwen2.5-1.5B-Instruct'

model = dict(
    type=VisionLanguageModel,
    vision_encoder=vision_encoder_path,
    llm=llm_path,
    projector='pixel_shuffle_mlp',    # InternVL's pixel shuffle (downsample_ratio, ps_version) + mlp1
    image_mode='tile',                # InternVL 2.5 dynamic tiling
    downsample_ratio=0.5,
    ps_version='v2',
    template=None,                    # the chat template: the previous stage's (pretrained_pth), else internvl2_5
    freeze_vision=True,
    freeze_projector=False,
    freeze_llm=True,
    vision_grad_ckpt=False,
    llm_grad_ckpt=True,               # recompute each layer but its attention kernel; 'full': everything
    llm_grad_ckpt_layers='auto',      # on a GPU, only the first layers its memory needs; None: all; or a number
    torch_dtype='auto',               # bf16 on GPUs and CPUs with native bf16 (AMX), else fp32; 'float32': off
    attn_implementation='sdpa',       # or 'flash_attention_2' (GPU, flash-attn installed), 'eager'
    loss_reduction='token',           # 'token', 'sample' or 'square' (InternVL 2.5's square averaging)
    pretrained_pth=None,              # previous stage: --cfg-options model.pretrained_pth=work_dirs/.../iter_N.pth
)
