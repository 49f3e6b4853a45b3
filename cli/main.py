def main() -> None:
    print("puremesh")
