"""The run folder: recipe, adapters, checkpoints, metrics and state, locked and written
atomically (folder.py); what a resume may change (resume.py); a run's model loaded back
(model.py); listing runs (listing.py).
Training writes here and export and inference read from here, so it comes before them.
Imports config/, models/, lora/ and data/."""
