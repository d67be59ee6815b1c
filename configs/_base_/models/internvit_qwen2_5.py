# InternViT-300M-448px-V2_5 + pixel-shuffle MLP projector + Qwen2.5-Instruct (InternVL 2.5's recipe).
from xtuner_plugins.models import InternVLModel

vision_encoder_path = 'OpenGVLab/InternViT-300M-448px-V2_5'
llm_path = 'Qwen/Qwen2.5-1.5B-Instruct'

model = dict(
    type=InternVLModel,
    vision_encoder=vision_encoder_path,
    llm=llm_path,
    projector='pixel_shuffle_mlp',    # InternVL's pixel shuffle (downsample_ratio, ps_version) + mlp1
    image_mode='tile',                # InternVL 2.5 dynamic tiling
    downsample_ratio=0.5,
    ps_version='v2',
    template='internvl2_5',
    freeze_vision=True,
    freeze_projector=False,
    freeze_llm=True,
    vision_grad_ckpt=False,
    llm_grad_ckpt=True,
    torch_dtype='auto',               # bf16 on GPUs, fp32 on a CPU
    attn_implementation='sdpa',       # or 'flash_attention_2' (GPU, flash-attn installed), 'eager'
    loss_reduction='token',           # 'token', 'sample' or 'square' (InternVL 2.5's square averaging)
    pretrained_pth=None,              # previous stage: --cfg-options model.pretrained_pth=work_dirs/.../iter_N.pth
)
