"""The prepared dataset: its row format (``format``), its readers (``read``) and the pair-making
actors that read it for training (``pairs``)."""
