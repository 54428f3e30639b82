"""Evaluation and inference: metrics (lDDT-Cα, lDDT, RMSD, distogram accuracy), whole-chain evaluation
of a model on a prepared cache, structure prediction from FASTA (+ MSAs) with mmCIF/PDB output, scoring
of two structure files, and training-run reports. Imports flow ``cli -> eval -> model, data``."""
