# SigLIP-so400m-patch14-384 + bilinear 2x down-sampling MLP + Qwen2.5-0.5B-Instruct: one 384 px tile per
# image, its 27x27 SigLIP features resized to 13x13 = 169 LLM tokens (xtuner_plugins/models/projector.py).
# Used as a delta over a stage config (configs/siglip_pretrain.py, configs/siglip_finetune.py).
#   huggingface-cli download google/siglip-so400m-patch14-384 --local-dir models/siglip-so400m-patch14-384
#   huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct
vision_encoder = dict(type='siglip', path='models/siglip-so400m-patch14-384')
projector = 'bilinear_mlp'
image_mode = 'resize'
llm_path = 'models/Qwen2.5-0.5B-Instruct'
# The data set takes its tile size, tokens per tile, image mode (and padding colour) and tokenizer from these.
