"""The input side: EgoClip and EgoMCQ metadata, video reading, transforms, tokenizer, toy data."""
