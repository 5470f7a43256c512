"""Data without a model in it: user-data readers, the built-in prompt sets, chat training
examples, sequence packing (over the compiled packer) and verifiable tasks."""
