"""`minigpt eval`: scoring text and measuring exposure bias."""
