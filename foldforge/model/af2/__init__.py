"""AlphaFold2 model parts (AF2 Suppl. 1.5-1.9): structure module and all-atom reconstruction."""
