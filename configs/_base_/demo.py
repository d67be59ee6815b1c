# The embedded demo's system message (configs/demo/*.py): 8 tokens of the tiny tokenizer, where InternVL's
# default system message is 111, more than the rest of a typical demo sample.
demo_system_message = 'Answer in one word.'
