# The embedded demo's system message (configs/demo/*.py). InternVL's default system message is about 130
# tokens of the tiny tokenizer, most of each demo sample: a short one makes every training step about 1.4x faster.
demo_system_message = 'Answer the question about the image with one word or digit.'
