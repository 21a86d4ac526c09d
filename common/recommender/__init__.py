"""The recommender: the SASRec model, its training, ranking, evaluation metrics and saved artifacts."""
