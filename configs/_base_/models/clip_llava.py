# LLaVA-1.5 on Qwen2.5: CLIP ViT-L/14-336 (second-to-last layer, CLS dropped: 24x24 = 576 tokens) + LLaVA's
# 2-layer MLP + Qwen2.5-0.5B-Instruct; each image padded to a square with CLIP's mean colour, one 336 px tile.
# Exports as transformers' LlavaForConditionalGeneration (tools/convert_to_official.py --format llava).
#   huggingface-cli download openai/clip-vit-large-patch14-336 --local-dir models/clip-vit-large-patch14-336
#   huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct
vision_encoder = dict(type='clip', path='models/clip-vit-large-patch14-336', select_layer=-2)
projector = 'mlp'
image_mode = 'pad'
llm_path = 'models/Qwen2.5-0.5B-Instruct'
# The data set takes its tile size, tokens per tile, image mode (and padding colour) and tokenizer from these.
