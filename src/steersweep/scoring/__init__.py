"""Stage 7, scores: text metrics, perplexity and next-token KL (metrics), behaviour probabilities
per item (behavior), an LLM judge (judge), the scorer that turns a batch's completions into rows
(scorer), and how steerable each setting is from its per-item scores (reliability)."""
